"""Tests of scripts.motion.torchio_motion: the TorchIO RandomMotion wrappers."""

import numpy as np
import torch
from monai.data import MetaTensor

from scripts.motion.torchio_motion import RandTorchIOMotion, RandTorchIOMotiond, torchio_motion


def _phantom():
    x = torch.zeros(1, 32, 36, 30)
    x[:, 8:24, 10:26, 8:22] = 100.0
    x[:, 12:20, 14:22, 12:18] = 200.0
    return MetaTensor(x, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])), meta={"filename_or_obj": "p.nii"})


def test_motion_changes_image_keeps_type_and_meta():
    img = _phantom()
    out = torchio_motion(img, degrees=(5, 8), translation=(5, 8), num_transforms=4, seed=3)
    assert isinstance(out, MetaTensor) and out.shape == img.shape and out.dtype == img.dtype
    assert out.meta["filename_or_obj"] == "p.nii"
    assert torch.allclose(out.affine, img.affine)
    assert (out - img).abs().mean() > 1.0
    # the image keeps most of its energy and its mean (k-space centre unmoved)
    assert abs(float(out.mean()) - float(img.mean())) < 0.05 * float(img.mean())


def test_zero_motion_is_identity():
    img = _phantom()
    out = torchio_motion(img, degrees=0.0, translation=0.0, num_transforms=2, seed=0)
    assert torch.allclose(out, img, atol=1e-3)


def test_reproducible_and_global_rng_untouched():
    img = _phantom()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = RandTorchIOMotion(prob=1.0).set_random_state(5)(img)
    assert torch.equal(torch.rand(1), expected_next)
    b = RandTorchIOMotion(prob=1.0).set_random_state(5)(img)
    c = RandTorchIOMotion(prob=1.0).set_random_state(6)(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dict_transform_writes_label_with_probability():
    t = RandTorchIOMotiond("image", prob=0.5).set_random_state(0)
    labels = []
    for _ in range(20):
        out = t({"image": _phantom(), "label": 0})
        moved = not torch.equal(out["image"], _phantom())
        assert out["label"] == int(moved)
        labels.append(out["label"])
    assert 3 <= sum(labels) <= 17
    never = RandTorchIOMotiond("image", prob=0.0)({"image": _phantom(), "label": 1})
    assert never["label"] == 1  # a label already 1 stays 1 when no motion is added
    assert np.isclose(float(never["image"].sum()), float(_phantom().sum()))
