"""K-space time-course motion simulation (after Valabregue et al.), pure torch.

Model
-----
The course ``(6, n_t)`` is linearly resampled to one pose per phase-encoding plane; planes are
acquired in k-space order (fftshifted index ``p = 0..L-1``, frequency ``p - L // 2``). Pose ``p`` moves
the object (push-forward) by ``y = R_p (x - c) + c + t_p``: ``R_p = Rz Rx Ry`` of the plane's Euler
angles about the array centre ``c``, axes = array axes (physical mm via the voxel spacing),
``t_p`` in mm. Plane ``p`` of the simulated k-space is plane ``p`` of the spectrum of the moved
object; the image is the magnitude (option: real part) of the inverse transform.

* Translation is applied exactly, as a per-plane phase ramp ``exp(-2 pi i f . d / N)`` (``d`` in voxels;
  circular, as in the NUFFT reference).
* Rotation: planes are grouped into ``n_segments`` clusters of similar rotation (weighted k-means on
  the Euler-angle vectors, weights = square root of each plane's k-space energy); each plane is taken
  from the spectrum of the image rotated to its cluster's (weighted mean) rotation. With
  ``n_segments >= L`` every plane gets its own rotation: the exact line-by-line model.
* Demeaning (``"none"``, ``"center"``, ``"energy"``) removes a global pose before simulation.
* ``oversampling`` zero-pads each side by ``2 * ceil(N * pct / 2)`` voxels (reference default 0.3, here
  0 by default: 4x the voxels for a reduction of wrap-around only).

Cost: ``n_segments`` trilinear rotations, one DFT along the phase axis restricted to each cluster's
planes (matrix products), one in-plane FFT per plane and one inverse 3D FFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import RandomizableTransform, Transform

from .base import RandMotionDictBase, as_volume, draw_phase_axis, parse_phase_axes, wrap_like
from .resample import Resampler, dft_matrices, euler_to_matrix, resample_rigid, voxel_spacing
from .timecourse import KSPACE_MOTION_PRESETS, TIME_COURSE_DEFAULTS, demean_course, random_time_course, resample_course

__all__ = [
    "DEFAULT_N_SEGMENTS",
    "apply_kspace_motion",
    "cluster_rotations",
    "plane_energy",
    "KSpaceMotion",
    "RandKSpaceMotion",
    "RandKSpaceMotiond",
]

#: Default number of rotation clusters (see docs/motion.md for the measured approximation error).
DEFAULT_N_SEGMENTS = 16

Demean = Literal["none", "center", "energy"]
Output = Literal["real", "magnitude"]


def plane_energy(vol: torch.Tensor) -> torch.Tensor:
    """Square root of the k-space energy of each plane along the last axis, fftshifted order ``(L,)``."""
    length = vol.shape[-1]
    spec = torch.view_as_real(torch.fft.rfft(vol.reshape(-1, length).float(), dim=-1))
    half_energy = spec.pow(2).sum(dim=(0, 2)).double().cpu()  # frequencies 0..L//2
    freqs = torch.arange(length) - length // 2  # fftshifted order; real input: E(-f) = E(f)
    return half_energy[freqs.abs()].sqrt()


def cluster_rotations(
    angles: torch.Tensor, k: int, weights: torch.Tensor | None = None, iterations: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group per-plane rotations into at most ``k`` clusters (deterministic weighted k-means).

    Args:
        angles: ``(L, 3)`` Euler angles in degrees.
        k: number of clusters; ``k >= L`` gives one cluster per plane (exact model).
        weights: ``(L,)`` non-negative plane weights (uniform if ``None``).

    Returns:
        ``labels (L,)`` int64 and ``centres (K', 3)`` (weighted mean angles), ``K' <= k``, unused
        clusters dropped.
    """
    a = angles.double().cpu().numpy()
    n = a.shape[0]
    if k >= n:
        return torch.arange(n), torch.from_numpy(a.copy())
    w = np.ones(n) if weights is None else np.clip(weights.double().cpu().numpy(), 0, None) + 1e-12

    def sqdist(c: np.ndarray) -> np.ndarray:  # (n, K) squared distances
        return ((a[:, None, :] - c[None, :, :]) ** 2).sum(-1)

    centres = [(a * w[:, None]).sum(0) / w.sum()]
    for _ in range(1, k):  # farthest-point initialisation (weighted)
        d = sqdist(np.stack(centres)).min(1) * w
        if d.max() <= 0:
            break
        centres.append(a[int(d.argmax())])
    c = np.stack(centres)
    for _ in range(iterations):
        labels = sqdist(c).argmin(1)
        new = c.copy()
        for j in range(c.shape[0]):
            m = labels == j
            if m.any():
                new[j] = (a[m] * w[m, None]).sum(0) / w[m].sum()
        if np.allclose(new, c):
            break
        c = new
    labels = sqdist(c).argmin(1)
    used = np.unique(labels)
    remap = np.full(c.shape[0], -1)
    remap[used] = np.arange(used.size)
    return torch.from_numpy(remap[labels]).long(), torch.from_numpy(c[used])


def _fftfreq_int(n: int, device: torch.device) -> torch.Tensor:
    return torch.fft.fftfreq(n, d=1.0 / n, device=device).round()


def _simulate_volume(
    vol: torch.Tensor,
    spacing: torch.Tensor,
    course: torch.Tensor,
    pmat: torch.Tensor,
    n_segments: int,
    weights: torch.Tensor,
    output: Output,
    resampler: Resampler,
) -> torch.Tensor:
    """One phase-axis-last volume ``(A, B, L)``.

    ``course (6, L)`` holds per-plane poses along the *original* array axes; ``pmat`` is the
    permutation matrix to the phase-last order (``u_perm = pmat @ u``) and ``spacing`` is already
    permuted.
    """
    na, nb, length = vol.shape
    dev, dt = vol.device, vol.dtype
    cdt = torch.complex64 if dt == torch.float32 else torch.complex128
    half = length // 2
    labels, centres = cluster_rotations(course[3:].T, n_segments, weights)
    shifts = ((course[:3].T @ pmat.T) / spacing).to(dev)  # (L, 3) voxels, permuted axes
    fa, fb = _fftfreq_int(na, dev).double(), _fftfreq_int(nb, dev).double()
    flat = vol.reshape(-1, length)
    centre = (torch.tensor([na, nb, length], dtype=torch.float64) - 1) / 2
    s = torch.diag(spacing)
    s_inv = torch.diag(1 / spacing)
    spectrum = torch.empty((length, na, nb), dtype=cdt, device=dev)  # planes first (contiguous)
    fill = vol.min()
    for j in range(centres.shape[0]):
        planes = torch.nonzero(labels == j).flatten()
        if planes.numel() == 0:
            continue
        if bool((centres[j] == 0).all()):
            moved = flat
        else:
            rot = pmat @ euler_to_matrix(centres[j]) @ pmat.T
            a = s_inv @ rot.T @ s  # pull-back of the push-forward rotation, index space
            b = centre - a @ centre
            moved = resample_rigid(vol.unsqueeze(0), a, b, fill, resampler)[0].reshape(-1, length)
        freqs = planes.to(dev) - half
        cos, sin = dft_matrices(length, freqs, dev, dt)
        m = freqs.numel()
        g = torch.mm(torch.cat([cos, -sin], dim=1).T, moved.T)  # (2m, A*B): hybrid space, planes first
        hyb = torch.complex(g[:m], g[m:]).reshape(m, na, nb)
        spec = torch.fft.fft2(hyb)
        d = shifts[planes.to(dev)]  # (m, 3)
        ramp_a = torch.exp(-2j * math.pi * d[:, 0:1] * fa[None, :] / na)  # (m, A)
        ramp_b = torch.exp(-2j * math.pi * d[:, 1:2] * fb[None, :] / nb)  # (m, B)
        ramp_z = torch.exp(-2j * math.pi * freqs.double() * d[:, 2] / length)  # (m,)
        spec *= ((ramp_a * ramp_z[:, None])[:, :, None] * ramp_b[:, None, :]).to(cdt)
        spectrum[freqs.remainder(length)] = spec
    img = torch.fft.ifftn(spectrum).permute(1, 2, 0)
    return (img.abs() if output == "magnitude" else img.real).to(dt)


def apply_kspace_motion(
    img: torch.Tensor,
    affine: torch.Tensor,
    course: torch.Tensor,
    phase_axis: int = 1,
    n_segments: int = DEFAULT_N_SEGMENTS,
    demean: Demean = "none",
    output: Output = "magnitude",
    oversampling: float = 0.0,
    resampler: Resampler = "auto",
    return_plane_course: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-space time-course motion of a channel-first volume.

    Args:
        img: ``(C, X, Y, Z)`` float tensor (any device); every channel gets the same motion.
        affine: ``(4, 4)`` index-to-world affine (only the voxel spacing is used).
        course: ``(6, n_t)`` poses (mm, degrees) along the array axes, in acquisition order.
        phase_axis: spatial axis (0, 1, 2) that is phase-encoded (one pose per plane along it).
        n_segments: number of rotation clusters ``K`` (``>=`` number of planes: exact model).
        demean: ``"none"``, ``"center"`` or ``"energy"``.
        output: ``"magnitude"`` (reference) or ``"real"``.
        oversampling: zero-padding fraction per axis before simulation (0: none).
        resampler: resampler.
        return_plane_course: also return the per-plane course ``(6, L)`` actually simulated.

    Returns:
        ``(C, X, Y, Z)`` tensor like ``img`` (and the per-plane course of the first channel).
    """
    if img.ndim != 4:
        raise ValueError(f"apply_kspace_motion: expected (C, X, Y, Z), got {tuple(img.shape)}")
    if phase_axis not in (0, 1, 2):
        raise ValueError(f"apply_kspace_motion: phase_axis must be 0, 1 or 2, got {phase_axis}")
    if output not in ("real", "magnitude"):
        raise ValueError(f"apply_kspace_motion: output must be 'real' or 'magnitude', got {output!r}")
    if n_segments < 1:
        raise ValueError(f"apply_kspace_motion: n_segments must be >= 1, got {n_segments}")
    course = torch.as_tensor(course, dtype=torch.float64)
    if course.ndim != 2 or course.shape[0] != 6 or course.shape[1] < 2:
        raise ValueError(f"apply_kspace_motion: course must be (6, n_t >= 2), got {tuple(course.shape)}")
    in_dtype = img.dtype
    work = img.float() if in_dtype not in (torch.float32, torch.float64) else img
    spacing = voxel_spacing(torch.as_tensor(affine))
    perm = [ax for ax in range(3) if ax != phase_axis] + [phase_axis]
    inv_perm = np.argsort(perm).tolist()
    pmat = torch.eye(3, dtype=torch.float64)[perm]
    pads = [2 * math.ceil(n * oversampling / 2) if oversampling > 0 else 0 for n in work.shape[1:]]
    out = torch.empty_like(work)
    plane_course = None
    for ch in range(work.shape[0]):
        vol = work[ch]
        if any(pads):
            vol = F.pad(vol, [pads[2], pads[2], pads[1], pads[1], pads[0], pads[0]])
        vol = vol.permute(*perm).contiguous()
        length = vol.shape[-1]
        weights = plane_energy(vol)
        pc = demean_course(resample_course(course, length), demean, weights)
        if plane_course is None:
            plane_course = pc
        res = _simulate_volume(vol, spacing[perm], pc, pmat, n_segments, weights, output, resampler)
        res = res.permute(*inv_perm)
        if any(pads):
            res = res[
                pads[0] : pads[0] + work.shape[1], pads[1] : pads[1] + work.shape[2], pads[2] : pads[2] + work.shape[3]
            ]
        out[ch] = res
    out = out.to(in_dtype)
    return (out, plane_course) if return_plane_course else out


class KSpaceMotion(Transform):
    """Apply a given time course (non-random core of :class:`RandKSpaceMotion`).

    Args: see :func:`apply_kspace_motion`; ``course`` is ``(6, n_t)`` (mm, degrees).
    """

    def __init__(
        self,
        course: Any,
        phase_axis: int = 1,
        n_segments: int = DEFAULT_N_SEGMENTS,
        demean: Demean = "none",
        output: Output = "magnitude",
        oversampling: float = 0.0,
        resampler: Resampler = "auto",
    ) -> None:
        self.course = torch.as_tensor(course, dtype=torch.float64)
        self.phase_axis, self.n_segments, self.demean = phase_axis, n_segments, demean
        self.output, self.oversampling, self.resampler = output, oversampling, resampler

    def __call__(self, img: Any) -> Any:
        data, affine = as_volume(img, where="KSpaceMotion")
        res = apply_kspace_motion(
            data,
            affine,
            self.course,
            self.phase_axis,
            self.n_segments,
            self.demean,
            self.output,
            self.oversampling,
            self.resampler,
        )
        return wrap_like(res, img)


class RandKSpaceMotion(RandomizableTransform):
    """Random k-space time-course motion, array transform.

    Args:
        prob: probability of applying motion.
        n_t: number of time points of the course (reference default 200).
        max_disp, max_rot, noise_base, swallow_frequency, swallow_magnitude, sudden_frequency,
        sudden_magnitude: shape of the course (see :mod:`scripts.motion.timecourse`).
        global_disp, global_rot: severity, ranges of the maximal pairwise displacement (mm) and
            rotation (degrees) after rescaling.
        severity: optional preset of :data:`~scripts.motion.timecourse.KSPACE_MOTION_PRESETS`
            (overrides ``global_disp``/``global_rot``).
        phase_axis: phase-encoded axis (0, 1, 2) or a sequence to draw from per call (reference: 1).
        n_segments, demean, output, oversampling, resampler: see :func:`apply_kspace_motion`.
    """

    def __init__(
        self,
        prob: float = 0.5,
        n_t: int = 200,
        max_disp: Sequence[float] = TIME_COURSE_DEFAULTS["max_disp"],
        max_rot: Sequence[float] = TIME_COURSE_DEFAULTS["max_rot"],
        noise_base: Sequence[float] = TIME_COURSE_DEFAULTS["noise_base"],
        swallow_frequency: Sequence[float] = TIME_COURSE_DEFAULTS["swallow_frequency"],
        swallow_magnitude: Sequence[float] = TIME_COURSE_DEFAULTS["swallow_magnitude"],
        sudden_frequency: Sequence[float] = TIME_COURSE_DEFAULTS["sudden_frequency"],
        sudden_magnitude: Sequence[float] = TIME_COURSE_DEFAULTS["sudden_magnitude"],
        global_disp: Sequence[float] = TIME_COURSE_DEFAULTS["global_disp"],
        global_rot: Sequence[float] = TIME_COURSE_DEFAULTS["global_rot"],
        severity: str | None = None,
        phase_axis: int | Sequence[int] = 1,
        n_segments: int = DEFAULT_N_SEGMENTS,
        demean: Demean = "none",
        output: Output = "magnitude",
        oversampling: float = 0.0,
        resampler: Resampler = "auto",
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        if severity is not None:
            if severity not in KSPACE_MOTION_PRESETS:
                raise ValueError(
                    f"RandKSpaceMotion: unknown severity {severity!r}; use one of {list(KSPACE_MOTION_PRESETS)}"
                )
            global_disp = KSPACE_MOTION_PRESETS[severity]["global_disp"]
            global_rot = KSPACE_MOTION_PRESETS[severity]["global_rot"]
        self.n_t = int(n_t)
        self.ranges = {
            "max_disp": max_disp,
            "max_rot": max_rot,
            "noise_base": noise_base,
            "swallow_frequency": swallow_frequency,
            "swallow_magnitude": swallow_magnitude,
            "sudden_frequency": sudden_frequency,
            "sudden_magnitude": sudden_magnitude,
            "global_disp": global_disp,
            "global_rot": global_rot,
        }
        random_time_course(np.random.RandomState(0), self.n_t, **self.ranges)  # validate early
        self.phase_axes = parse_phase_axes(phase_axis, "RandKSpaceMotion")
        self.n_segments, self.demean, self.output = int(n_segments), demean, output
        self.oversampling, self.resampler = float(oversampling), resampler
        self._course: torch.Tensor | None = None
        self._info: dict[str, float] = {}
        self._axis = self.phase_axes[0]
        self._plane_course: torch.Tensor | None = None

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._course, self._info = random_time_course(self.R, self.n_t, **self.ranges)
        self._axis = draw_phase_axis(self.R, self.phase_axes)

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        if self._course is None:
            raise RuntimeError("RandKSpaceMotion: call randomize() before __call__(randomize=False)")
        data, affine = as_volume(img, where="RandKSpaceMotion")
        res, self._plane_course = apply_kspace_motion(
            data,
            affine,
            self._course,
            self._axis,
            self.n_segments,
            self.demean,
            self.output,
            self.oversampling,
            self.resampler,
            return_plane_course=True,
        )
        return wrap_like(res, img)

    def last_params(self, img: Any = None) -> dict[str, torch.Tensor]:
        """``course (6, n_t)``, ``global_disp``, ``global_rot``, ``phase_axis`` as float32 tensors."""
        assert self._course is not None
        return {
            "course": self._course.float(),
            "global_disp": torch.tensor(self._info["global_disp"], dtype=torch.float32),
            "global_rot": torch.tensor(self._info["global_rot"], dtype=torch.float32),
            "phase_axis": torch.tensor(float(self._axis)),
        }

    def zero_params(self, img: Any = None) -> dict[str, torch.Tensor]:
        return {
            "course": torch.zeros(6, self.n_t),
            "global_disp": torch.tensor(0.0),
            "global_rot": torch.tensor(0.0),
            "phase_axis": torch.tensor(-1.0),
        }

    def last_course(self, img: Any = None) -> torch.Tensor:
        """Per-plane course ``(6, L)`` of the last application (after demeaning)."""
        assert self._plane_course is not None
        return self._plane_course


class RandKSpaceMotiond(RandMotionDictBase):
    """Dictionary version of :class:`RandKSpaceMotion`; sets ``label_key`` to 1 when applied.

    Args:
        keys: image keys (same motion for all).
        label_key, prob, params_key, metrics_key, allow_missing_keys: see
            :class:`scripts.motion.base.RandMotionDictBase`. ``params_key`` stores ``course (6, n_t)``,
            ``global_disp``, ``global_rot``, ``phase_axis`` and ``applied``.
        **kwargs: arguments of :class:`RandKSpaceMotion` (except ``prob``).
    """

    array_class = RandKSpaceMotion
