"""Tests of scripts/motion/severity.py against hand-computed answers."""

import math

import pytest
import torch

from scripts.motion.severity import METRIC_NAMES, max_pairwise_motion, motion_metrics, ssim3d


def test_translation_only_course():
    course = torch.zeros(6, 4)
    course[0] = torch.tensor([0.0, 0.0, 2.0, 2.0])  # mean 1: demeaned |t| = 1 everywhere
    m = motion_metrics(course)
    assert set(m) == set(METRIC_NAMES)
    assert m["mean_disp_jenkinson"] == pytest.approx(1.0)
    assert m["mean_disp_power"] == pytest.approx(1.0)
    assert m["mean_fd_power"] == pytest.approx(2.0 / 3.0)
    assert m["max_translation"] == pytest.approx(2.0)
    assert m["max_rotation"] == 0.0
    assert math.isnan(m["ssim"])


def test_rotation_course_jenkinson():
    course = torch.zeros(6, 2)
    course[5] = torch.tensor([-1.0, 1.0])  # demeaned rz = +-1 degree
    m = motion_metrics(course, radius=80.0)
    th = math.radians(1.0)
    # A = Rz - I: trace(A^T A) = 4 (1 - cos th)
    expected = math.sqrt(80.0**2 / 5 * 4 * (1 - math.cos(th)))
    assert m["mean_disp_jenkinson"] == pytest.approx(expected, rel=1e-9)
    assert m["mean_disp_power"] == pytest.approx(80 * th)
    assert max_pairwise_motion(course)[1] == pytest.approx(2.0)


def test_ssim():
    torch.manual_seed(0)
    x = torch.rand(1, 10, 10, 10)
    assert ssim3d(x, x) == pytest.approx(1.0)
    assert ssim3d(x, x + 0.3 * torch.rand_like(x)) < 0.95
    with pytest.raises(ValueError, match="shapes differ"):
        ssim3d(x, x[:, :5])


def test_ssim_equals_scikit_image():
    """MONAI's SSIMMetric with a uniform 3x3x3 window is scikit-image's SSIM with sample covariances."""
    from skimage.metrics import structural_similarity

    torch.manual_seed(1)
    x = torch.rand(12, 11, 10)
    y = (x + 0.2 * torch.randn_like(x)).clamp(min=0)
    dyn = float(max(x.max(), y.max()))
    expected = structural_similarity(x.numpy().astype("float64"), y.numpy().astype("float64"), win_size=3,
                                     data_range=dyn, K1=0.01, K2=0.01, use_sample_covariance=True)
    assert ssim3d(x, y) == pytest.approx(expected, abs=1e-5)
