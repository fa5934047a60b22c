"""Tests of scripts.averaging: weight averaging, BatchNorm recalibration, the pre-training overlay's batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from scripts.averaging import average_and_recalibrate, average_states, recalibrate_batchnorm, training_batches
from scripts.networks import Conv5FC3

SMALL = (16, 16, 16)


def test_average_states_means_floats_and_keeps_the_largest_counter():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3), "h": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7), "h": torch.tensor([2.0], dtype=torch.float16)}
    out = average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and out["n"].item() == 7
    assert out["h"].dtype == torch.float32 and out["h"].item() == 1.5
    with pytest.raises(ValueError, match="other keys"):
        average_states([a, {"w": a["w"], "n": a["n"]}])
    with pytest.raises(ValueError, match="shapes differ"):
        average_states([a, {**b, "w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="at least one"):
        average_states([])


def test_recalibrate_batchnorm_gives_the_plain_mean_over_all_batches_and_restores_the_network():
    torch.manual_seed(0)
    net = Conv5FC3(input_size=SMALL).eval()
    batches = [torch.randn(2, 1, *SMALL) * (1 + i) + i for i in range(5)]
    recalibrate_batchnorm(net, iter(batches))
    assert not net.training and net.convolutions[1].momentum == 0.1
    with torch.no_grad():  # the first BatchNorm sees the first convolution's output: its mean over every batch
        expected = torch.stack([net.convolutions[0](b).mean(dim=(0, 2, 3, 4)) for b in batches]).mean(0)
    assert torch.allclose(net.convolutions[1].running_mean, expected, atol=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(net, iter([]))


def test_pretrain_overlay_batches_and_average_and_recalibrate(tmp_path):
    overrides = {"voxel_size": 4.0, "num_workers": 0, "motion_resampler": "grid_sample"}
    network, images = training_batches(seed=3, overrides=overrides)
    first = list(itertools.islice(images, 3))
    # as in training: the first micro-batch whole, then every pair split across consecutive micro-batches
    assert [tuple(x.shape) for x in first] == [(4, 1, 43, 52, 45), (2, 1, 43, 52, 45), (4, 1, 43, 52, 45)]
    assert network(first[0]).shape == (4, 2)
    torch.manual_seed(1)
    states = [Conv5FC3(input_size=(43, 52, 45)).state_dict() for _ in range(2)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"s{i}.pt")
        torch.save({"model": state, "trainer": {"iteration": i}}, paths[-1])
    average_and_recalibrate(paths, tmp_path / "avg.pt", batches=2, seed=3, overrides=overrides)
    out = torch.load(tmp_path / "avg.pt", weights_only=True)
    key = "convolutions.0.weight"
    assert torch.allclose(out[key], (states[0][key] + states[1][key]) / 2)
    assert not torch.equal(out["convolutions.1.running_mean"], torch.zeros(8))
