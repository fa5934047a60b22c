"""Tests of scripts/motion/base.py: range parsing, input checks, label handling."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.motion.base import as_volume, parse_range, set_motion_label


def test_parse_range():
    assert parse_range(3, "d") == (-3.0, 3.0)
    assert parse_range((2, 8), "d") == (2.0, 8.0)
    with pytest.raises(ValueError, match="degrees"):
        parse_range((8, 2), "degrees")
    with pytest.raises(ValueError, match="translation"):
        parse_range(-1, "translation")


def test_as_volume_checks_and_affine():
    aff = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    data, affine = as_volume(MetaTensor(torch.zeros(1, 4, 5, 6), affine=aff))
    assert data.shape == (1, 4, 5, 6) and not isinstance(data, MetaTensor)
    torch.testing.assert_close(affine, aff.double())
    with pytest.raises(ValueError, match="channel-first"):
        as_volume(torch.zeros(4, 5, 6), where="X")
    _, ident = as_volume(torch.zeros(1, 3, 3, 3))
    torch.testing.assert_close(ident, torch.eye(4, dtype=torch.float64))


def test_set_motion_label():
    d = {}
    set_motion_label(d, "label", False)
    assert d["label"] == 0
    d = {"label": 0}
    set_motion_label(d, "label", True)
    assert d["label"] == 1 and isinstance(d["label"], int)
    d = {"label": torch.tensor([0.0])}
    set_motion_label(d, "label", True)
    assert d["label"].dtype == torch.float32 and d["label"].item() == 1.0
    d = {"label": np.int64(0)}
    set_motion_label(d, "label", False)
    assert d["label"] == 0
