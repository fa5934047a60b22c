"""Tests of scripts.performance: the allocator setting never fails, channels-last 3D changes memory
order and nothing else (same outputs and gradients), and the prepare_batch keeps image and label.

Speed itself is measured by tests/benchmarks/bench_training.py, not asserted here.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BUNDLE_ROOT, SMALL_SHAPE

from scripts import performance
from scripts.networks import Conv5FC3
from scripts.performance import CHANNELS_LAST, ChannelsLastPrepareBatch, channels_last, tune_allocator


def test_tune_allocator_returns_a_bool_is_idempotent_and_can_be_disabled():
    # a process setting: run in a fresh interpreter so it does not leak into the test session
    code = textwrap.dedent("""
        import sys
        from scripts.performance import tune_allocator
        first, second, off = tune_allocator(), tune_allocator(), tune_allocator(enable=False)
        assert all(isinstance(v, bool) for v in (first, second, off)), (first, second, off)
        assert first == second and off is False, (first, second, off)
        if sys.platform.startswith("linux") and "glibc" in __import__("platform").libc_ver()[0]:
            assert first is True
        print("ok")
        """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tune_allocator_never_raises_without_glibc(monkeypatch):
    monkeypatch.setattr(performance, "_tuned", False)

    def no_libc(*args, **kwargs):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert tune_allocator() is False
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: object())  # a libc without mallopt (musl-like)
    assert tune_allocator() is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tune_allocator() is False
    assert performance._tuned is False


def _step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = net(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in net.named_parameters()}


def test_channels_last_conv5fc3_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    reference = Conv5FC3(input_size=SMALL_SHAPE)
    fast = Conv5FC3(input_size=SMALL_SHAPE)
    fast.load_state_dict(reference.state_dict())
    params_before = list(fast.parameters())
    assert channels_last(fast) is fast
    assert [p is q for p, q in zip(params_before, fast.parameters())] == [True] * len(
        params_before
    )  # optimisers keep working
    second_conv = fast.convolutions[4].weight  # 16x8x3x3x3: (the first, with one input channel, is both formats)
    assert second_conv.is_contiguous(memory_format=CHANNELS_LAST) and not second_conv.is_contiguous()
    x = torch.randn(2, 1, *SMALL_SHAPE)
    y = torch.tensor([0, 1])
    out_ref, grads_ref = _step(reference.train(), x, y)
    out_fast, grads_fast = _step(fast.train(), x.contiguous(memory_format=CHANNELS_LAST), y)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-4)
    assert grads_fast.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():  # eval mode: running statistics, as in inference
        torch.testing.assert_close(fast.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-4)


def test_channels_last_disabled_leaves_the_module_unchanged():
    net = Conv5FC3(input_size=SMALL_SHAPE)
    strides = {name: p.stride() for name, p in net.named_parameters()}
    assert channels_last(net, enable=False) is net
    assert {name: p.stride() for name, p in net.named_parameters()} == strides


@pytest.mark.parametrize("enable", [True, False])
def test_channels_last_prepare_batch_keeps_image_and_label(enable):
    torch.manual_seed(0)
    image = torch.randn(3, 2, 5, 6, 7)  # two channels: channels-last differs from contiguous
    label = torch.tensor([0, 1, 1])
    out_image, out_label = ChannelsLastPrepareBatch(enable=enable)(
        {"image": image, "label": label}, torch.device("cpu")
    )
    assert out_image.is_contiguous(memory_format=CHANNELS_LAST) is enable
    assert torch.equal(out_image, image)
    assert torch.equal(out_label, label)


def test_channels_last_prepare_batch_as_tensor_drops_metadata_only():
    from monai.data import MetaTensor

    image = MetaTensor(torch.randn(2, 2, 5, 6, 7), affine=torch.eye(4))
    label = torch.tensor([1, 0])
    kept, _ = ChannelsLastPrepareBatch()({"image": image, "label": label})
    plain, plain_label = ChannelsLastPrepareBatch(as_tensor=True)({"image": image, "label": label})
    assert isinstance(kept, MetaTensor)
    assert type(plain) is torch.Tensor and type(plain_label) is torch.Tensor
    assert plain.is_contiguous(memory_format=CHANNELS_LAST)
    assert torch.equal(plain, image.as_tensor()) and torch.equal(plain_label, label)


def test_channels_last_prepare_batch_leaves_other_ranks_alone():
    image = torch.randn(2, 3, 8, 8)  # 2D images: channels-last 3D does not apply
    out_image, _ = ChannelsLastPrepareBatch()({"image": image, "label": torch.tensor([0, 1])})
    assert out_image.is_contiguous() and torch.equal(out_image, image)


def test_restore_allocator_and_worker_init_never_raise(monkeypatch):
    import monai.data.utils

    from scripts import performance

    seeded = []
    monkeypatch.setattr(monai.data.utils, "worker_init_fn", lambda worker_id: seeded.append(worker_id))
    assert isinstance(performance.restore_allocator(), bool)
    performance.worker_init(3)
    assert seeded == [3]  # MONAI's per-worker seeding still runs
    assert performance.tune_allocator() in (True, False)  # can be tuned again after a restore


def _seeded_losses(dataset_dir, out_dir, **overrides) -> list[float]:
    """Per-micro-batch training losses of 4 epochs of configs/train.yaml at the test size, seed 0."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from monai.handlers import from_engine

    wf = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "train.yaml"),
        workflow_type="train",
        bundle_root=str(out_dir),
        dataset_dir=str(dataset_dir),
        spatial_size=list(SMALL_SHAPE),
        num_workers=0,
        batch_size=4,
        micro_batch_size=2,
        val_interval=100,
        **{"train#trainer#max_epochs": 4},
        **overrides,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    loss_of = from_engine(["loss"], first=True)  # the decollated output holds the micro-batch loss in every item
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: losses.append(float(loss_of(engine.state.output)))
    )
    trainer.run()
    return losses


def test_train_yaml_fast_path_gives_the_loss_curve_of_the_plain_path(small_demo, tmp_path):
    # the defaults (plain tensors, channels-last network and batches, BatchNorm and pooling fused) against
    # MONAI's plain path on the same seeded run: motion, batches and initial weights are the same, only
    # float rounding may differ
    fast = _seeded_losses(small_demo, tmp_path / "fast")
    plain = _seeded_losses(
        small_demo,
        tmp_path / "plain",
        channels_last=False,
        tune_allocator=False,
        fuse_batchnorm_pool=False,
        **{"train#prepare_batch#as_tensor": False},
    )
    assert len(fast) == len(plain) >= 8
    assert len(set(fast)) > 1  # the run learns something: not a constant
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-3, atol=1e-3)
