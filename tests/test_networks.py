"""Tests of scripts.networks: Conv5FC3's layer table, parameter count, keys, PadMaxPool3d and the fused
BatchNorm + pooling of its training pass."""

import copy

import pytest
import torch
from monai.data import MetaTensor

import scripts.networks
from scripts.networks import Conv5FC3, PadMaxPool3d, batchnorm_maxpool3d, classifier_head_names, set_batchnorm_momentum


def test_conv5fc3_exact_parameter_count_at_full_size():
    net = Conv5FC3()
    assert net.flattened_size == 128 * 6 * 7 * 6 == 32256
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 42_293_972
    assert sum(p.numel() for n, p in net.named_parameters() if n.startswith("fc.")) == 41_999_252
    buffers = sum(b.numel() for n, b in net.named_buffers())
    assert buffers == 501  # BN running mean/var (2 x 248) + 5 batch counters


def test_conv5fc3_state_dict_keys_match_clinicadl():
    keys = list(Conv5FC3(input_size=(32, 32, 32)).state_dict())
    conv_idx = sorted({int(k.split(".")[1]) for k in keys if k.startswith("convolutions.")})
    assert conv_idx == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17]
    assert [k for k in keys if k.startswith("fc.")] == [
        "fc.2.weight",
        "fc.2.bias",
        "fc.4.weight",
        "fc.4.bias",
        "fc.6.weight",
        "fc.6.bias",
    ]
    assert keys[:6] == [
        "convolutions.0.weight",
        "convolutions.0.bias",
        "convolutions.1.weight",
        "convolutions.1.bias",
        "convolutions.1.running_mean",
        "convolutions.1.running_var",
    ]


@pytest.mark.parametrize("size", [(43, 52, 45), (33, 40, 17)])
def test_conv5fc3_output_shape_reduced_sizes(size):
    net = Conv5FC3(input_size=size, dropout=0.3).eval()
    out = net(torch.randn(3, 1, *size))
    assert out.shape == (3, 2)
    assert torch.isfinite(out).all()


def test_conv5fc3_rejects_wrong_input_size():
    net = Conv5FC3(input_size=(32, 32, 32))
    with pytest.raises(ValueError, match="spatial size"):
        net(torch.randn(1, 1, 32, 32, 30))


def test_conv5fc3_dropout_default_zero_and_configurable():
    assert Conv5FC3(input_size=(32, 32, 32)).fc[1].p == 0.0
    assert Conv5FC3(input_size=(32, 32, 32), dropout=0.5).fc[1].p == 0.5
    assert classifier_head_names(Conv5FC3(input_size=(32, 32, 32))) == ("fc",)


def test_set_batchnorm_momentum_slows_the_running_statistics():
    torch.manual_seed(0)
    slow, fast = Conv5FC3(input_size=(32, 32, 32)), Conv5FC3(input_size=(32, 32, 32))
    fast.load_state_dict(slow.state_dict())
    assert set_batchnorm_momentum(slow, 0.01) is slow
    bns = [m for m in slow.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 5 and all(m.momentum == 0.01 for m in bns)
    x = torch.randn(2, 1, 32, 32, 32) * 3 + 5
    for net in (slow, fast):
        net.train()(x)
    # the first layer's running mean moved a tenth as far from its initial zero
    moved_slow, moved_fast = slow.convolutions[1].running_mean, fast.convolutions[1].running_mean
    assert torch.allclose(moved_slow * 10, moved_fast, rtol=1e-4, atol=1e-6) and moved_fast.abs().max() > 0
    assert set_batchnorm_momentum(fast, None).convolutions[1].momentum == 0.1
    with pytest.raises(ValueError, match="momentum"):
        set_batchnorm_momentum(fast, 0.0)


def test_padmaxpool_pads_low_side_and_ceil_size():
    pool = PadMaxPool3d()
    x = torch.arange(27, dtype=torch.float32).reshape(1, 1, 3, 3, 3)
    y = pool(x)
    assert y.shape == (1, 1, 2, 2, 2)
    # low-side padding: the first output voxel sees only x[0,0,0] (the pad is zero);
    # the last sees the 2x2x2 block x[1:3,1:3,1:3] whose max is x[2,2,2] = 26
    assert y[0, 0, 0, 0, 0] == 0.0
    assert y[0, 0, 1, 1, 1] == 26.0
    assert y[0, 0, 1, 0, 0] == x[0, 0, 2, 0, 0]  # x index 1..2 paired, y/z index 0 alone
    even = torch.rand(1, 2, 4, 6, 8)
    assert torch.equal(pool(even), torch.nn.functional.max_pool3d(even, 2, 2))


def _zero_pad_pool(x):
    """ClinicaDL's PadMaxPool3d: an explicit zero pad on the low side, then 2x2x2 max pooling."""
    pads = [(-size) % 2 for size in x.shape[2:]]
    return torch.nn.functional.max_pool3d(torch.nn.functional.pad(x, (pads[2], 0, pads[1], 0, pads[0], 0)), 2, 2)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 2, 8, 9, 4), (2, 4, 3, 3, 3), (1, 1, 1, 2, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_padmaxpool_equals_the_explicit_zero_pad_in_outputs_and_gradients(shape, channels_last):
    # the pooling's own padding replaces the copy into a padded tensor: same windows, same maxima
    x = torch.rand(shape) + 0.1  # nonnegative (after a ReLU) and without ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    y = PadMaxPool3d()(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = _zero_pad_pool(x)
    (expected * weights).sum().backward()
    assert y.shape == expected.shape
    assert torch.equal(y, expected)
    assert torch.equal(grad, x.grad)
    assert torch.equal(PadMaxPool3d(explicit_pad=True)(x), expected)  # the layer's own ClinicaDL mode


def test_padmaxpool_keeps_the_explicit_pad_where_pooling_padding_cannot_express_it():
    # stride 3 would need 2 voxels of padding, more than half the kernel: the explicit pad is used
    pool = PadMaxPool3d(kernel_size=3, stride=3)
    x = torch.rand(1, 1, 4, 6, 7) + 0.1
    pads = [(-size) % 3 for size in x.shape[2:]]
    expected = torch.nn.functional.max_pool3d(torch.nn.functional.pad(x, (pads[2], 0, pads[1], 0, pads[0], 0)), 3, 3)
    assert torch.equal(pool(x), expected)


def test_conv5fc3_parameter_gradients_are_those_of_clinicadls_zero_pad():
    torch.manual_seed(0)
    net = Conv5FC3(input_size=(37, 42, 35), fuse_batchnorm_pool=False)  # modules on both sides: bit-identical
    x = torch.randn(3, 1, 37, 42, 35)
    out = net(x)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()

    for module in net.convolutions:
        if isinstance(module, PadMaxPool3d):
            module.explicit_pad = True  # ClinicaDL's zero pad, copied into a new tensor
    expected = net(x)
    expected.sum().backward()
    assert torch.equal(out, expected)
    for name, p in net.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def _training_steps(networks, channels_last):
    """One forward and backward pass of each network (in training mode) on the same random 3x1x37x42x35 batch."""
    x = torch.randn(3, 1, 37, 42, 35)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        networks = [n.to(memory_format=torch.channels_last_3d) for n in networks]
    weights = torch.randn(3, 2)
    outs = []
    for net in networks:
        out = net(x)
        (out * weights).sum().backward()
        outs.append(out)
    return outs


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv5fc3_pooling_before_relu_gives_clinicadls_outputs_and_gradients(channels_last):
    torch.manual_seed(0)
    clinicadl = Conv5FC3(input_size=(37, 42, 35), pool_before_relu=0)
    fast = Conv5FC3(input_size=(37, 42, 35), fuse_batchnorm_pool=False)  # the two modules: bit-identical
    fast.load_state_dict(clinicadl.state_dict())  # the same state dict whatever the order
    assert [type(m).__name__ for m in clinicadl.convolutions[:4]] == ["Conv3d", "BatchNorm3d", "ReLU", "PadMaxPool3d"]
    assert [type(m).__name__ for m in fast.convolutions[:4]] == ["Conv3d", "BatchNorm3d", "PadMaxPool3d", "ReLU"]
    assert type(fast.get_submodule(fast.saliency_layer)).__name__ == "ReLU"  # block 4 keeps ClinicaDL's order
    assert type(fast.convolutions[10]).__name__ == "PadMaxPool3d" and type(fast.convolutions[14]).__name__ == "ReLU"
    outs = _training_steps((clinicadl, fast), channels_last)
    assert torch.equal(outs[0], outs[1])
    for (name, p), q in zip(clinicadl.named_parameters(), fast.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for name, buf in clinicadl.named_buffers():  # BatchNorm statistics of the training pass
        assert torch.equal(buf, fast.get_buffer(name)), name
    with pytest.raises(ValueError, match="pool_before_relu"):
        Conv5FC3(input_size=(32, 32, 32), pool_before_relu=4)


# ---- the other three architectures of the paper ----
from scripts.networks import SECNN, ResNet3D, ViT3D, feature_block_names  # noqa: E402

FULL = (169, 208, 179)


def _n_params(net, prefix=""):
    return sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize(
    "cls, total, head",
    [(ResNet3D, 3_517_314, 2_622_210), (SECNN, 3_523_049, 2_622_210), (ViT3D, 226_367_490, 2_050 + 2_048)],
)
def test_exact_parameter_counts_and_output_shape_at_full_size(cls, total, head):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = cls()
        out = net(torch.empty(2, 1, *FULL))
    assert tuple(out.shape) == (2, 2)
    assert _n_params(net) == total
    assert sum(_n_params(net, name) for name in classifier_head_names(net)) == head


def test_residual_networks_layer_table():
    with torch.device("meta"):
        res, se = ResNet3D(), SECNN()
    assert res.flattened_size == se.flattened_size == 128 * 4 * 5 * 4
    assert _n_params(res, "features") == 895_104 and _n_params(se, "features") == 900_839
    # the last six parameter tensors (the authors' freezing rule) are the head plus two body tensors
    assert [n for n, _ in res.named_parameters()][-6:] == [
        "features.4.bn2.bias",
        "features.4.shortcut.0.weight",
        "fc.1.weight",
        "fc.1.bias",
        "fc.4.weight",
        "fc.4.bias",
    ]
    assert [n for n, _ in se.named_parameters()][-6:-4] == [
        "features.4.se_block.fc2.bias",
        "features.4.shortcut.0.weight",
    ]
    assert isinstance(res.fc[2], torch.nn.ELU) and res.fc[3].p == 0.8 and se.fc[1].p == 0.5
    assert se.features[0].se_block.fc1.out_features == 1  # reduction 8: 8 -> 1 -> 8
    assert feature_block_names(res)[-1] == ("features.4",)


def test_residual_networks_forward_and_size_check():
    torch.manual_seed(0)
    for cls in (ResNet3D, SECNN):
        net = cls(input_size=(63, 64, 65)).eval()  # the smallest size five blocks accept
        assert net(torch.randn(2, 1, 63, 64, 65)).shape == (2, 2)
        small = cls(input_size=(43, 52, 45), channels=(4, 8, 8, 8))
        assert small(torch.randn(1, 1, 43, 52, 45)).shape == (1, 2)
    with pytest.raises(ValueError, match="at least 63"):
        ResNet3D(input_size=(43, 52, 45))
    with pytest.raises(ValueError, match="spatial size"):
        ResNet3D(input_size=(63, 64, 65))(torch.randn(1, 1, 64, 64, 64))


def test_vit_patch_layout_and_head():
    with torch.device("meta"):
        vit = ViT3D()
    assert vit.patch_size == (56, 52, 59) and vit.crop_size == (168, 208, 177)  # 3x4x3 = 36 patches
    assert tuple(vit.vit.patch_embedding.position_embeddings.shape) == (1, 36, 1024)
    assert vit.vit.patch_embedding.patch_embeddings[1].in_features == 56 * 52 * 59
    assert vit.vit.blocks[0].attn.scale == pytest.approx(64**-0.5)
    with torch.device("meta"):
        assert ViT3D(attention_scale="model").vit.blocks[0].attn.scale == pytest.approx(1024**-0.5)
    small = ViT3D(input_size=(43, 52, 45), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4).eval()
    x = torch.randn(2, 1, 43, 52, 45)
    out = small(x)
    assert out.shape == (2, 2)
    # voxels beyond the crop (x index 42) do not change the output
    x2 = x.clone()
    x2[:, :, 42] = 100.0
    assert torch.allclose(small(x2), out)
    assert feature_block_names(small) == (("vit.blocks.0",), ("vit.blocks.1",))


def test_new_architectures_export_to_torchscript():
    torch.manual_seed(0)
    nets = [
        ResNet3D(input_size=(43, 52, 45), channels=(4, 8, 8, 8)),
        SECNN(input_size=(43, 52, 45), channels=(4, 8, 8, 8)),
        ViT3D(input_size=(43, 52, 45), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4),
    ]
    x = torch.randn(1, 1, 43, 52, 45)
    for net in nets:
        net.eval()
        scripted = torch.jit.script(net)  # what `monai.bundle ckpt_export` does
        with torch.no_grad():
            assert torch.allclose(scripted(x), net(x), atol=1e-5)


def _close(actual, expected, what, rtol=1e-5):
    """Equal within ``rtol`` of the largest magnitude of ``expected`` (sums of many voxels: float rounding)."""
    scale = float(expected.detach().abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale, msg=what)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("size", [(9, 10, 11), (8, 12, 6)])
def test_batchnorm_maxpool3d_matches_batchnorm_then_pooling(channels_last, momentum, size):
    torch.manual_seed(0)
    modules = torch.nn.BatchNorm3d(5, momentum=momentum)
    with torch.no_grad():
        modules.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0, 1.0]))  # negative scales pool the minimum
        modules.bias.normal_()
        modules.running_mean.normal_()
    fused = copy.deepcopy(modules)
    y = torch.randn(3, 5, *size) * 2 + 0.5
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last_3d)
    weights = None
    results = []
    for step, norm in enumerate((modules, fused)):
        x = y.clone().requires_grad_(True)
        out = PadMaxPool3d()(norm(x)) if step == 0 else batchnorm_maxpool3d(x, norm)
        weights = torch.randn_like(out) if weights is None else weights
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, norm.weight.grad, norm.bias.grad))
    assert results[1][0].shape == results[0][0].shape == (3, 5, *((s + 1) // 2 for s in size))
    for name, actual, expected in zip(("output", "input grad", "weight grad", "bias grad"), results[1], results[0]):
        _close(actual, expected, name)
    for name in ("running_mean", "running_var"):
        _close(fused.get_buffer(name), modules.get_buffer(name), name)
    assert int(fused.num_batches_tracked) == int(modules.num_batches_tracked) == 1
    if channels_last:
        assert results[1][1].is_contiguous(memory_format=torch.channels_last_3d)


def test_batchnorm_maxpool3d_without_affine_parameters_and_its_refusals():
    torch.manual_seed(1)
    plain, fused = torch.nn.BatchNorm3d(4, affine=False), torch.nn.BatchNorm3d(4, affine=False)
    y = torch.randn(2, 4, 6, 7, 5)
    x1, x2 = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    PadMaxPool3d()(plain(x1)).sum().backward()
    batchnorm_maxpool3d(x2, fused).sum().backward()
    _close(x2.grad, x1.grad, "input grad")
    with pytest.raises(ValueError, match="training mode"):
        batchnorm_maxpool3d(y, fused.eval())
    with pytest.raises(ValueError, match="training mode"):
        batchnorm_maxpool3d(y, torch.nn.BatchNorm3d(4, track_running_stats=False))


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv5fc3_fused_training_step_matches_the_modules(channels_last):
    torch.manual_seed(0)
    modules = Conv5FC3(input_size=(37, 42, 35), fuse_batchnorm_pool=False)
    with torch.no_grad():
        modules.convolutions[1].weight[:3] *= -1  # some negative BatchNorm scales in block 1
    fused = copy.deepcopy(modules)
    fused.fuse_batchnorm_pool = True
    outs = _training_steps((modules, fused), channels_last)
    _close(outs[1], outs[0], "logits")
    all_grads = torch.cat([p.grad.flatten() for p in modules.parameters()])
    for (name, p), q in zip(modules.named_parameters(), fused.parameters()):
        # a convolution's bias before BatchNorm has no effect: its gradient is rounding noise around 0
        scale = p.grad if p.grad.abs().max() > 1e-3 * all_grads.abs().max() else all_grads
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-4 * float(scale.abs().max()), msg=name)
    for name, buf in modules.named_buffers():
        _close(fused.get_buffer(name).float(), buf.float(), name)


def test_conv5fc3_takes_the_fused_path_only_where_it_applies(monkeypatch):
    calls = []

    def counting(y, norm, pool=None):
        calls.append(tuple(y.shape))
        return batchnorm_maxpool3d(y, norm, pool)

    monkeypatch.setattr(scripts.networks, "batchnorm_maxpool3d", counting)
    torch.manual_seed(0)
    net = Conv5FC3(input_size=(32, 32, 32))
    x = torch.randn(2, 1, 32, 32, 32)
    net(x)
    assert [shape[1] for shape in calls] == [8, 16, 32]  # blocks 1-3, which pool before their ReLU
    calls.clear()
    Conv5FC3(input_size=(32, 32, 32), pool_before_relu=1)(x)
    assert len(calls) == 1
    calls.clear()
    with torch.no_grad():
        net.eval()(x)
    assert not calls  # evaluation: BatchNorm's running statistics, the plain module path
    net.train()
    seen = []
    handle = net.convolutions[5].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    net(x)
    assert len(seen) == 1 and [shape[1] for shape in calls] == [8, 32]  # a hooked block runs its modules
    handle.remove()
    calls.clear()
    Conv5FC3(input_size=(32, 32, 32), fuse_batchnorm_pool=False)(x)
    assert not calls
    out = net(MetaTensor(x))  # MONAI's MetaTensor batches keep the module path (and their type)
    assert not calls and isinstance(out, MetaTensor)
    out.sum().backward()
    scripted = torch.jit.script(net.eval())  # TorchScript compiles the module path only
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
