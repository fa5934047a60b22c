"""Tests of scripts.networks: Conv5FC3's layer table, parameter count, keys and PadMaxPool3d."""

import pytest
import torch

from scripts.networks import Conv5FC3, PadMaxPool3d, classifier_head_names


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
        "fc.2.weight", "fc.2.bias", "fc.4.weight", "fc.4.bias", "fc.6.weight", "fc.6.bias"
    ]
    assert keys[:6] == [
        "convolutions.0.weight", "convolutions.0.bias", "convolutions.1.weight",
        "convolutions.1.bias", "convolutions.1.running_mean", "convolutions.1.running_var",
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
