"""Tests of scripts/motion/kspace_motion.py: exact limits, clustering, transforms."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.motion.kspace_motion import (
    KSpaceMotion,
    RandKSpaceMotion,
    RandKSpaceMotiond,
    apply_kspace_motion,
    cluster_rotations,
)
from scripts.motion.severity import max_pairwise_motion
from scripts.motion.resample import euler_to_matrix, resample_rigid
from scripts.motion.timecourse import random_time_course

EYE = torch.eye(4, dtype=torch.float64)


def _phantom(shape=(24, 28, 26), seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(1, *shape)
    v[:, 5:-5, 6:-6, 5:-5] = torch.rand(1, shape[0] - 10, shape[1] - 12, shape[2] - 10, generator=g) + 1
    return torch.nn.functional.avg_pool3d(v[None], 3, 1, 1)[0]


def test_zero_motion_returns_input():
    v = _phantom()
    out = apply_kspace_motion(v, EYE, torch.zeros(6, 200), resampler="eager")
    torch.testing.assert_close(out, v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_constant_translation_is_circular_shift(axis):
    v = _phantom()
    course = torch.zeros(6, 50)
    course[0], course[1], course[2] = 3.0, -2.0, 1.0
    out = apply_kspace_motion(v, EYE, course, phase_axis=axis, output="real", resampler="eager")
    torch.testing.assert_close(out, torch.roll(v, (3, -2, 1), (1, 2, 3)), atol=1e-4, rtol=0)


def test_constant_rotation_is_rotated_image():
    v = _phantom()
    course = torch.zeros(6, 50)
    course[3:] = torch.tensor([4.0, -3.0, 5.0])[:, None]
    out = apply_kspace_motion(v, EYE, course, n_segments=4, output="real", resampler="eager")
    c = (torch.tensor(v.shape[1:], dtype=torch.float64) - 1) / 2
    a = euler_to_matrix(torch.tensor([4.0, -3.0, 5.0], dtype=torch.float64)).T
    expected = resample_rigid(v, a, c - a @ c, v.min(), "eager")
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_exact_model_is_line_by_line():
    """K >= planes: each plane's spectrum is that of the image moved to the plane's own pose."""
    v = _phantom((12, 14, 10))
    course, _ = random_time_course(np.random.RandomState(0), 40, global_disp=(2, 2), global_rot=(3, 3))
    out, planes = apply_kspace_motion(v, EYE, course, phase_axis=1, n_segments=10**6, output="magnitude",
                                      resampler="eager", return_plane_course=True)
    c = (torch.tensor(v.shape[1:], dtype=torch.float64) - 1) / 2
    spec = torch.zeros(v.shape[1:], dtype=torch.complex128)
    for p in range(v.shape[2]):
        a = euler_to_matrix(planes[3:, p]).T
        b = c - a @ (c + planes[:3, p])
        moved = resample_rigid(v, a, b, v.min(), "eager")[0]
        # translation by a phase ramp is circular: build it in k-space for the reference too
        rot_only = resample_rigid(v, a, c - a @ c, v.min(), "eager")[0]
        f = torch.fft.fftshift(torch.fft.fftn(rot_only.double()))
        freqs = [torch.arange(n) - n // 2 for n in v.shape[1:]]
        ramp = torch.exp(-2j * torch.pi * sum(
            (freqs[ax].double() * planes[ax, p] / v.shape[1 + ax]).reshape([-1 if k == ax else 1 for k in range(3)])
            for ax in range(3)))
        spec[:, p] = (f * ramp)[:, p]
        del moved
    expected = torch.fft.ifftn(torch.fft.ifftshift(spec)).abs().float()
    torch.testing.assert_close(out[0], expected, atol=1e-4, rtol=0)


def test_fewer_segments_approximate_the_exact_model():
    v = _phantom()
    course, _ = random_time_course(np.random.RandomState(1), 200, global_disp=(3, 3), global_rot=(3, 3))
    exact = apply_kspace_motion(v, EYE, course, n_segments=10**6, resampler="eager")
    errs = [float((apply_kspace_motion(v, EYE, course, n_segments=k, resampler="eager") - exact).norm()) for k in (2, 8, 16)]
    artefact = float((exact - v).norm())
    assert errs[0] > errs[2]
    assert errs[2] < 0.05 * artefact


def test_translation_preserves_energy():
    """Phase ramps are unitary (Parseval): a translation-only course keeps the image energy."""
    v = _phantom()
    course, _ = random_time_course(np.random.RandomState(2), 200, global_disp=(4, 4), global_rot=(0, 0))
    course[3:] = 0
    out = apply_kspace_motion(v, EYE, course, resampler="eager")
    assert float(out.pow(2).sum()) == pytest.approx(float(v.pow(2).sum()), rel=1e-4)
    assert (out - v).abs().max() > 0.1


def test_cluster_rotations():
    angles = torch.tensor([[0.0, 0, 0]] * 5 + [[3.0, 0, 0]] * 5)
    labels, centres = cluster_rotations(angles, 2)
    assert labels[:5].unique().numel() == 1 and labels[5:].unique().numel() == 1 and labels[0] != labels[5]
    assert sorted(centres[:, 0].tolist()) == [0.0, 3.0]
    labels, centres = cluster_rotations(angles, 20)
    assert centres.shape == (10, 3)


def test_random_transform_reproducible_and_severity():
    img = MetaTensor(_phantom(), affine=EYE.float())
    t = RandKSpaceMotion(prob=1.0, severity="severe", resampler="eager")
    t.set_random_state(4)
    a = t(img)
    assert isinstance(a, MetaTensor) and a.dtype == torch.float32 and a.shape == img.shape
    p = t.last_params()
    dt, dr = max_pairwise_motion(p["course"])
    assert dt == pytest.approx(float(p["global_disp"]), rel=1e-5) and 2 <= dt <= 4
    assert dr == pytest.approx(float(p["global_rot"]), rel=1e-5)
    t.set_random_state(4)
    torch.testing.assert_close(t(img), a)
    torch.testing.assert_close(KSpaceMotion(p["course"], resampler="eager")(img), a, atol=1e-5, rtol=0)


def test_dict_transform_writes_label_params_metrics():
    t = RandKSpaceMotiond(keys="image", prob=1.0, params_key="mp", metrics_key="mm", resampler="eager", n_t=50)
    t.set_random_state(0)
    d = t({"image": MetaTensor(_phantom(), affine=EYE.float())})
    assert d["label"] == 1 and d["mp"]["course"].shape == (6, 50) and float(d["mp"]["applied"]) == 1.0
    # metrics use the per-plane course (resampled to 28 planes), whose extremes can only shrink
    assert 0 < d["mm"]["max_translation"] <= float(d["mp"]["global_disp"]) + 1e-6
    assert 0 < d["mm"]["ssim"] < 1
    t0 = RandKSpaceMotiond(keys="image", prob=0.0, params_key="mp", n_t=50)
    d0 = t0({"image": _phantom(), "label": 0})
    assert d0["label"] == 0 and d0["mp"]["course"].shape == (6, 50) and float(d0["mp"]["applied"]) == 0.0
