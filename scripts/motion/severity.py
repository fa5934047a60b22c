"""Motion severity of a simulated acquisition: displacement measures of its pose course, and SSIM (the
classifier's metrics are in :mod:`scripts.metrics`).

A *course* is a ``(6, n)`` tensor: one rigid pose per k-space phase-encoding plane in acquisition
order, rows ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in degrees (ITK Euler order, see
:func:`scripts.motion.resample.euler_to_matrix`).

Definitions (radius r = 80 mm, the head-sized sphere of Jenkinson 2002 and Power 2012):

``mean_disp_jenkinson``
    Poses are first demeaned (parameter mean over planes subtracted, as in the k-space simulator's
    reference code). Per plane: ``sqrt(r^2/5 * trace(A^T A) + |t|^2)`` with ``A = R - I``; then the
    mean over planes (mm). RMS displacement over a sphere of radius r about the rotation centre.
``mean_disp_power``
    Demeaned poses; per plane ``sum|t| + r * sum|rot in rad|``; mean over planes (mm).
``mean_fd_power``
    Power's framewise displacement between consecutive planes, ``sum|dt| + r * sum|drot in rad|``,
    averaged over the ``n - 1`` steps (mm).
``max_translation`` / ``max_rotation``
    Largest pairwise distance between any two planes' translation vectors (mm) / Euler-angle
    vectors (degrees). For the k-space simulator these equal the sampled severity.
``ssim``
    Mean 3D SSIM between the clean and the corrupted image (MONAI's ``SSIMMetric``: a uniform 3x3x3
    window, sample covariances, ``k1 = k2 = 0.01`` and data range ``L = max(max(clean), max(corrupted))``).
"""

from __future__ import annotations

import math

import torch

from .resample import euler_to_matrix

__all__ = ["METRIC_NAMES", "motion_metrics", "ssim3d", "max_pairwise_motion"]

METRIC_NAMES = ("mean_disp_jenkinson", "mean_disp_power", "mean_fd_power", "max_translation", "max_rotation", "ssim")


def _check_course(course: torch.Tensor) -> torch.Tensor:
    if course.ndim != 2 or course.shape[0] != 6:
        raise ValueError(f"a motion course must have shape (6, n), got {tuple(course.shape)}")
    return course.double()


def max_pairwise_motion(course: torch.Tensor) -> tuple[float, float]:
    """Largest pairwise translation distance (mm) and rotation-vector distance (degrees)."""
    c = _check_course(course)
    dt = torch.cdist(c[:3].T, c[:3].T).max().item()
    dr = torch.cdist(c[3:].T, c[3:].T).max().item()
    return dt, dr


def ssim3d(clean: torch.Tensor, moved: torch.Tensor, k1: float = 0.01, k2: float = 0.01, window: int = 3) -> float:
    """Mean SSIM over all full 3D windows of two same-shaped volumes ``(..., X, Y, Z)``: MONAI's
    :class:`~monai.metrics.SSIMMetric` with a uniform ``window`` and the data range of the pair."""
    from monai.metrics import SSIMMetric

    if clean.shape != moved.shape:
        raise ValueError(f"ssim3d: shapes differ {tuple(clean.shape)} vs {tuple(moved.shape)}")
    x = clean.reshape(-1, 1, *clean.shape[-3:]).float()
    y = moved.reshape(-1, 1, *moved.shape[-3:]).float().to(x.device)
    dyn = float(torch.maximum(x.max(), y.max()))
    if dyn == 0:
        return 1.0
    metric = SSIMMetric(spatial_dims=3, data_range=dyn, kernel_type="uniform", win_size=window, k1=k1, k2=k2)
    return float(metric(y, x).mean())


def motion_metrics(
    course: torch.Tensor, clean: torch.Tensor | None = None, moved: torch.Tensor | None = None, radius: float = 80.0
) -> dict[str, float]:
    """All metrics of :data:`METRIC_NAMES` as Python floats (``ssim`` is NaN without images)."""
    c = _check_course(course).cpu()
    d = c - c.mean(dim=1, keepdim=True)
    rot = euler_to_matrix(d[3:].T)  # (n, 3, 3)
    a = rot - torch.eye(3, dtype=rot.dtype)
    jenk = torch.sqrt(radius**2 / 5 * (a * a).sum(dim=(1, 2)) + (d[:3] ** 2).sum(0))
    rad = math.pi / 180
    power = d[:3].abs().sum(0) + radius * rad * d[3:].abs().sum(0)
    if c.shape[1] > 1:
        step = c.diff(dim=1)
        fd = float((step[:3].abs().sum(0) + radius * rad * step[3:].abs().sum(0)).mean())
    else:
        fd = 0.0
    dt, dr = max_pairwise_motion(c)
    ssim = ssim3d(clean, moved) if clean is not None and moved is not None else float("nan")
    return {
        "mean_disp_jenkinson": float(jenk.mean()),
        "mean_disp_power": float(power.mean()),
        "mean_fd_power": fd,
        "max_translation": dt,
        "max_rotation": dr,
        "ssim": ssim,
    }
