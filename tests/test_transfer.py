"""Tests of scripts.transfer: loading stage-1 weights, freezing all but the classifier head, BatchNorm mode."""

import copy

import pytest
import torch
from torch import nn

from scripts.networks import SECNN, Conv5FC3, ResNet3D, ViT3D
from scripts.transfer import (
    count_parameters,
    freeze_batchnorm_statistics,
    load_pretrained,
    prepare_finetuning,
    trainable_module_names,
)

SMALL = (43, 52, 45)


def _small(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "conv5fc3":
        return Conv5FC3(input_size=SMALL)
    if name == "resnet3d":
        return ResNet3D(input_size=SMALL, channels=(4, 8, 8, 8))
    if name == "secnn":
        return SECNN(input_size=SMALL, channels=(8, 8, 8, 8))
    return ViT3D(input_size=SMALL, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)


def _train_step(net: nn.Module, steps: int = 1) -> None:
    """Adam steps on trainable parameters only, as train.yaml's optimiser does."""
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    net.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 1, *SMALL, generator=gen)
        loss = nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", ["conv5fc3", "resnet3d", "secnn", "vit"])
def test_after_a_finetuning_step_only_the_head_changed(name, tmp_path):
    stage1 = _small(name)
    torch.save(stage1.state_dict(), tmp_path / "model.pt")
    net = _small(name)
    torch.manual_seed(5)
    for p in net.parameters():  # make sure loading really replaces the fresh weights
        nn.init.normal_(p)
    prepare_finetuning(net, tmp_path / "model.pt")
    head = trainable_module_names(net)
    before = _snapshot(net)
    for k, v in stage1.state_dict().items():
        assert torch.equal(before[k], v), f"{k} was not loaded"
    _train_step(net)
    after = _snapshot(net)
    params = dict(net.named_parameters())
    for key in params:
        in_head = any(key.startswith(h + ".") for h in head)
        assert params[key].requires_grad == in_head
        if in_head:
            assert not torch.equal(before[key], after[key]), f"head parameter {key} did not change"
        else:
            assert torch.equal(before[key], after[key]), f"frozen parameter {key} changed"
    assert count_parameters(net, trainable_only=True) == sum(
        p.numel() for n, p in net.named_parameters() if any(n.startswith(h + ".") for h in head)
    )


def test_conv5fc3_head_is_the_three_linear_layers_and_bn_statistics_update_by_default(tmp_path):
    net = _small("conv5fc3")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    prepare_finetuning(net, tmp_path / "model.pt")
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [
        "fc.2.weight", "fc.2.bias", "fc.4.weight", "fc.4.bias", "fc.6.weight", "fc.6.bias"
    ]
    mean_before = net.convolutions[1].running_mean.clone()
    _train_step(net)
    assert not torch.equal(net.convolutions[1].running_mean, mean_before)  # "update": as the authors' code
    assert torch.equal(net.convolutions[1].weight, torch.load(tmp_path / "model.pt")["convolutions.1.weight"])


def test_bn_mode_frozen_keeps_running_statistics_and_state_dict_keys(tmp_path):
    net = _small("resnet3d")
    keys = list(net.state_dict())
    torch.save(net.state_dict(), tmp_path / "model.pt")
    prepare_finetuning(net, tmp_path / "model.pt", bn_mode="frozen")
    stats_before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    _train_step(net, steps=2)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats_before.items())
    assert not net.features[0].bn1.training and net.fc.training
    assert list(net.state_dict()) == keys
    clone = copy.deepcopy(net)  # the class switch survives copying
    clone.train()
    assert not clone.features[0].bn1.training
    with pytest.raises(ValueError, match="bn_mode"):
        prepare_finetuning(_small("resnet3d"), bn_mode="eval")


def test_last_blocks_and_full_finetuning_options(tmp_path):
    net = _small("conv5fc3")
    assert trainable_module_names(net, n_last_blocks=1) == ("fc", "convolutions.16", "convolutions.17")
    prepare_finetuning(net, n_last_blocks=2)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"fc.2", "fc.4", "fc.6", "convolutions.12", "convolutions.13", "convolutions.16", "convolutions.17"}
    vit = _small("vit")
    prepare_finetuning(vit, full=True)
    assert count_parameters(vit, trainable_only=True) == count_parameters(vit)
    with pytest.raises(ValueError, match="has 5 blocks"):
        trainable_module_names(_small("conv5fc3"), n_last_blocks=6)
    with pytest.raises(ValueError, match="no submodule"):
        prepare_finetuning(_small("conv5fc3"), trainable=["classifier"])


def test_load_pretrained_errors_and_skip_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 1"):
        load_pretrained(_small("conv5fc3"), tmp_path / "missing.pt")
    three = Conv5FC3(input_size=SMALL, num_classes=3)
    torch.save(three.state_dict(), tmp_path / "three.pt")
    with pytest.raises(ValueError, match="fc.6.weight"):
        load_pretrained(_small("conv5fc3"), tmp_path / "three.pt")
    net = _small("conv5fc3")
    fresh_head = net.fc[6].weight.detach().clone()
    load_pretrained(net, tmp_path / "three.pt", skip_mismatched=True)
    assert torch.equal(net.fc[6].weight, fresh_head)
    assert torch.equal(net.fc[2].weight, three.fc[2].weight)
    torch.save({"model": three.state_dict()}, tmp_path / "wrapped.pt")  # a checkpoint dict is unwrapped
    load_pretrained(Conv5FC3(input_size=SMALL, num_classes=3), tmp_path / "wrapped.pt")


def test_freeze_batchnorm_statistics_excludes_trained_modules():
    net = _small("resnet3d")
    names = freeze_batchnorm_statistics(net, exclude=("features.3",))
    assert "features.0.bn1" in names and not any(n.startswith("features.3") for n in names)
    net.train()
    assert net.features[3].bn1.training and not net.features[2].bn2.training
