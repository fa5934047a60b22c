"""Random 6-DoF motion time courses for the k-space simulator (after Valabregue et al.).

A course is a float64 tensor ``(6, n_t)``: rows ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in degrees,
columns evenly spaced acquisition times on ``[0, 1]``. It is the sum of

1. a multi-octave smooth drift per row (octave ``i`` has ``round(n_t / 2**i)`` uniform control
   points, PCHIP-interpolated, weight ``2**i``; sum min-max scaled to ``[-0.5, 0.5]`` then times
   ``max_disp`` or ``max_rot``);
2. swallowing spikes ``exp(-100 j / (n_t - 1))`` circularly placed at random times, on ``tz`` and ``rx``;
3. sudden steps (Heaviside from a random onset) with independent uniform ``(-1, 1)`` components
   times the step magnitudes;

and is finally rescaled **exactly** so that the largest pairwise distance between two translation
vectors equals ``global_disp`` mm and between two rotation vectors ``global_rot`` degrees: these two
numbers are the severity of the motion.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator

from .base import parse_range

__all__ = [
    "KSPACE_MOTION_PRESETS",
    "TIME_COURSE_DEFAULTS",
    "random_time_course",
    "rescale_course",
    "resample_course",
    "demean_course",
]

#: Default ranges (the reference implementation's): each is ``U(low, high)``; counts are
#: integers drawn from ``[low, high)``.
TIME_COURSE_DEFAULTS: dict[str, tuple[float, float]] = {
    "max_disp": (2.0, 5.0),
    "max_rot": (2.0, 5.0),
    "noise_base": (5.0, 15.0),
    "swallow_frequency": (0, 5),
    "swallow_magnitude": (2.0, 6.0),
    "sudden_frequency": (0, 5),
    "sudden_magnitude": (2.0, 6.0),
    "global_disp": (1.0, 2.0),
    "global_rot": (1.0, 2.0),
}

#: Named severities: maximal pairwise displacement (mm) and rotation (degrees) ranges.
KSPACE_MOTION_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "mild": {"global_disp": (0.5, 1.0), "global_rot": (0.5, 1.0)},
    "moderate": {"global_disp": (1.0, 2.0), "global_rot": (1.0, 2.0)},
    "severe": {"global_disp": (2.0, 4.0), "global_rot": (2.0, 4.0)},
}


def _perlin(rng: np.random.RandomState, n_t: int, n_octaves: int) -> np.ndarray:
    """Multi-octave smooth noise on ``n_t`` points scaled to ``[-0.5, 0.5]``."""
    t = np.linspace(0.0, 1.0, n_t)
    total = np.zeros(n_t)
    for i in range(n_octaves):
        n_pts = int(round(n_t / 2**i))
        if n_pts <= 1:
            continue
        ctrl = rng.uniform(0.0, 1.0, n_pts)
        total += 2**i * PchipInterpolator(np.linspace(0.0, 1.0, n_pts), ctrl)(t)
    span = total.max() - total.min()
    if span <= 0:
        return np.zeros(n_t)
    return (total - total.min()) / span - 0.5


def _count(rng: np.random.RandomState, bounds: tuple[float, float]) -> int:
    """Integer in ``[low, high)`` (``low`` when the range is empty)."""
    lo, hi = int(bounds[0]), int(bounds[1])
    return int(rng.randint(lo, max(hi, lo + 1)))


def rescale_course(course: torch.Tensor, global_disp: float, global_rot: float) -> torch.Tensor:
    """Scale translations/rotations so their largest pairwise distances equal the targets.

    A part without any motion is left at zero.
    """
    c = course.double().clone()
    for rows, target in ((slice(0, 3), global_disp), (slice(3, 6), global_rot)):
        span = torch.cdist(c[rows].T, c[rows].T).max()
        if span > 0:
            c[rows] *= target / span
    return c


def random_time_course(
    rng: np.random.RandomState, n_t: int = 200, **ranges: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """Draw one course.

    Args:
        rng: numpy random state (e.g. a MONAI transform's ``self.R``).
        n_t: number of time points.
        **ranges: overrides of :data:`TIME_COURSE_DEFAULTS` (scalar ``d`` means ``(-d, d)`` except for
            counts and sizes, which must be pairs or non-negative scalars used as ``(0, d)``).

    Returns:
        ``course (6, n_t)`` float64 and the drawn scalars (``global_disp``, ``global_rot``, ...).
    """
    unknown = set(ranges) - set(TIME_COURSE_DEFAULTS)
    if unknown:
        raise ValueError(f"random_time_course: unknown parameters {sorted(unknown)}")
    if n_t < 2:
        raise ValueError(f"random_time_course: n_t must be >= 2, got {n_t}")
    r = {}
    for k, default in TIME_COURSE_DEFAULTS.items():
        v = ranges.get(k, default)
        r[k] = (0.0, float(v)) if isinstance(v, (int, float)) else parse_range(v, k)
    u = {k: float(rng.uniform(*r[k])) for k in ("max_disp", "max_rot", "noise_base")}
    sw_t, sw_r = rng.uniform(*r["swallow_magnitude"], size=2)
    su_t, su_r = rng.uniform(*r["sudden_magnitude"], size=2)
    n_sw = _count(rng, r["swallow_frequency"])
    n_su = _count(rng, r["sudden_frequency"])
    g_d = float(rng.uniform(*r["global_disp"]))
    g_r = float(rng.uniform(*r["global_rot"]))

    course = np.zeros((6, n_t))
    n_oct = int(round(u["noise_base"]))
    if n_oct > 0:
        for row in range(6):
            course[row] = _perlin(rng, n_t, n_oct) * (u["max_disp"] if row < 3 else u["max_rot"])
    pulse = np.exp(-100.0 * np.arange(n_t) / (n_t - 1))
    spikes = np.zeros(n_t)
    for _ in range(n_sw):
        spikes += np.roll(pulse, int(round(rng.uniform() * n_t)))
    course[2] += sw_t * spikes
    course[3] += sw_r * spikes
    for _ in range(n_su):
        onset = int(np.ceil(rng.uniform() * n_t))
        step = rng.uniform(-1.0, 1.0, 6) * np.array([su_t] * 3 + [su_r] * 3)
        course[:, onset:] += step[:, None]
    out = rescale_course(torch.from_numpy(course), g_d, g_r)
    info = {"global_disp": g_d, "global_rot": g_r, "n_swallow": float(n_sw), "n_sudden": float(n_su)} | u
    return out, info


def resample_course(course: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation of a ``(6, n_t)`` course onto ``n`` evenly spaced times on ``[0, 1]``."""
    c = course.double()
    n_t = c.shape[1]
    if n_t == n:
        return c.clone()
    pos = torch.linspace(0, n_t - 1, n, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=n_t - 2)
    frac = pos - lo
    return c[:, lo] * (1 - frac) + c[:, lo + 1] * frac


def demean_course(
    course: torch.Tensor, mode: Literal["none", "center", "energy"] = "none", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove a global pose from a per-plane course ``(6, n)`` (planes in k-space order).

    ``"center"`` subtracts the pose of the central plane (index ``n // 2``, frequency 0);
    ``"energy"`` subtracts the mean weighted by ``weights`` (``(n,)``, e.g. the square root of each
    plane's k-space energy); ``"none"`` keeps the course.
    """
    c = course.double()
    if mode == "none":
        return c.clone()
    if mode == "center":
        return c - c[:, c.shape[1] // 2 : c.shape[1] // 2 + 1]
    if mode == "energy":
        if weights is None or weights.numel() != c.shape[1]:
            raise ValueError("demean_course: 'energy' needs one weight per plane")
        w = weights.double().to(c.device)
        return c - (c * w).sum(1, keepdim=True) / w.sum()
    raise ValueError(f"demean_course: mode must be 'none', 'center' or 'energy', got {mode!r}")
