"""Tests of scripts/motion/timecourse.py: severity rescale, reproducibility, resampling, demeaning."""

import numpy as np
import pytest
import torch

from scripts.motion.severity import max_pairwise_motion
from scripts.motion.timecourse import demean_course, random_time_course, rescale_course, resample_course


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rescale_gives_requested_maximal_motion(seed):
    course, info = random_time_course(np.random.RandomState(seed), 200, global_disp=(1.5, 3.0), global_rot=(0.5, 1.0))
    assert course.shape == (6, 200)
    dt, dr = max_pairwise_motion(course)
    assert dt == pytest.approx(info["global_disp"], rel=1e-9)
    assert dr == pytest.approx(info["global_rot"], rel=1e-9)
    assert 1.5 <= info["global_disp"] <= 3.0 and 0.5 <= info["global_rot"] <= 1.0


def test_rescale_exact_and_zero_safe():
    c = torch.zeros(6, 3)
    c[0] = torch.tensor([0.0, 3.0, 4.0])
    out = rescale_course(c, 2.0, 1.0)
    assert max_pairwise_motion(out)[0] == pytest.approx(2.0)
    assert torch.all(out[3:] == 0)


def test_same_seed_same_course():
    a, _ = random_time_course(np.random.RandomState(5), 50)
    b, _ = random_time_course(np.random.RandomState(5), 50)
    c, _ = random_time_course(np.random.RandomState(6), 50)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="unknown"):
        random_time_course(np.random.RandomState(0), 50, maxDisp=(1, 2))


def test_resample_and_demean():
    c = torch.zeros(6, 3, dtype=torch.float64)
    c[0] = torch.tensor([0.0, 2.0, 4.0])
    r = resample_course(c, 5)
    torch.testing.assert_close(r[0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(demean_course(r, "center")[0], torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    assert demean_course(r, "energy", w)[0, -1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="weight"):
        demean_course(r, "energy")
