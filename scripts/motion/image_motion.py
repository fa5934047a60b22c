"""Image-based motion simulation (Shaw et al. 2019; the model of TorchIO's ``RandomMotion``).

Model
-----
``N`` rigid positions are drawn. Position ``j`` is a pull-back map in world **LPS** coordinates
(TorchIO's convention, so identical numbers give identical images):
``p_in = R_j (p_out - c) + c + t_j`` with ``R_j = Rz Rx Ry`` of the angles ``degrees[j]`` (ITK
Euler order) and ``t_j = translation[j]`` in mm. The ``N + 1`` images (the unmoved one first) fill
contiguous k-space segments along the phase-encoding axis: with times ``tau_j`` the segment
boundaries (fftshifted index) are ``floor(L * tau_j)``. The unmoved image is swapped into the
segment that contains the k-space centre (``c = min{j : tau_j > 0.5}``, else ``N``). The output is
the real part (option: magnitude) of the inverse transform.

TorchIO 1.2.1 sets the rotation centre on a SimpleITK transform and then rebuilds the transform
from its matrix and translation only, which drops the centre: its rotations are effectively about
the world origin (0, 0, 0). ``center="world_origin"`` reproduces that; the default ``"image"``
rotates about the geometric centre of the array (index ``(n - 1) / 2``).

Speed
-----
* Out-of-volume samples get the image minimum, inside samples trilinear interpolation with border
  clamping, as SimpleITK does.
* Only the phase-axis DFT is needed: in-plane transforms cancel because segments are whole planes.
  The output is ``I + Re(IDFT_z(sum_s P_s DFT_z(I_s - I)))``; each moved image contributes only the
  frequencies of its own segment, computed as a real matrix product with a cosine/sine table of
  those frequencies, and the inverse uses Hermitian symmetry (only |f| columns are needed).
* Rotations are trilinear resamplings (see :mod:`scripts.motion.resample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import RandomizableTransform, Transform

from .base import RandMotionDictBase, as_volume, draw_phase_axis, parse_phase_axes, parse_range, wrap_like
from .resample import Resampler, dft_matrices, euler_to_matrix, resample_rigid, rigid_index_map

__all__ = [
    "IMAGE_MOTION_PRESETS",
    "apply_image_motion",
    "image_motion_course",
    "sample_image_motion_params",
    "segment_layout",
    "ImageMotion",
    "RandImageMotion",
    "RandImageMotiond",
]

#: Named severities: (degrees range, translation range in mm, number of positions).
IMAGE_MOTION_PRESETS: dict[str, dict[str, Any]] = {
    "mild": {"degrees": (1.0, 2.0), "translation": (1.0, 2.0), "num_transforms": 4},
    "moderate": {"degrees": (2.0, 4.0), "translation": (2.0, 4.0), "num_transforms": 4},
    "severe": {"degrees": (4.0, 8.0), "translation": (4.0, 8.0), "num_transforms": 4},
    "paper": {"degrees": (2.0, 8.0), "translation": (2.0, 8.0), "num_transforms": 4},
}

Center = Literal["image", "world_origin"]
Output = Literal["real", "magnitude"]
_LPS = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


def sample_image_motion_params(
    rng: np.random.RandomState,
    degrees: tuple[float, float],
    translation: tuple[float, float],
    num_transforms: int,
    perturbation: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Draw TorchIO-distributed parameters: i.i.d. uniform angles/shifts and jittered times.

    Returns float32 tensors ``degrees (N, 3)``, ``translation (N, 3)``, ``times (N,)``.
    """
    n = int(num_transforms)
    step = 1.0 / (n + 1)
    deg = rng.uniform(degrees[0], degrees[1], size=(n, 3))
    trans = rng.uniform(translation[0], translation[1], size=(n, 3))
    times = np.arange(1, n + 1) * step + rng.uniform(-step * perturbation, step * perturbation, size=n)
    return {
        "degrees": torch.as_tensor(deg, dtype=torch.float32),
        "translation": torch.as_tensor(trans, dtype=torch.float32),
        "times": torch.as_tensor(times, dtype=torch.float32),
    }


def segment_layout(times: torch.Tensor, length: int) -> tuple[list[int], list[int]]:
    """Segment boundaries and sources along a phase axis of ``length`` planes.

    Returns:
        ``bounds`` (N + 2 ints, 0 first, ``length`` last; segment ``s`` is ``[bounds[s], bounds[s+1])``
        in fftshifted index) and ``source`` (N + 1 ints: ``-1`` for the unmoved image, else the row of
        the parameters used by that segment).
    """
    t = torch.as_tensor(times, dtype=torch.float32).reshape(-1)
    n = t.numel()
    cuts = torch.floor(t * torch.tensor(float(length), dtype=torch.float32)).long().clamp(0, length).tolist()
    bounds = [0, *cuts, length]
    later = torch.nonzero(t > 0.5).flatten()
    centre = int(later[0]) if later.numel() else n
    spectra = [-1, *range(n)]  # spectrum 0 = unmoved, spectrum j = parameter row j - 1
    spectra[0], spectra[centre] = spectra[centre], spectra[0]
    return bounds, spectra


def image_motion_course(
    degrees: torch.Tensor, translation: torch.Tensor, times: torch.Tensor, length: int
) -> torch.Tensor:
    """Per-plane pose course ``(6, length)`` (mm, degrees) of an image-based motion, for metrics."""
    bounds, source = segment_layout(times, length)
    course = torch.zeros(6, length, dtype=torch.float64)
    for s, row in enumerate(source):
        if row >= 0:
            course[:3, bounds[s] : bounds[s + 1]] = translation[row].double().unsqueeze(1)
            course[3:, bounds[s] : bounds[s + 1]] = degrees[row].double().unsqueeze(1)
    return course


def _index_maps(
    affine: torch.Tensor, shape: Sequence[int], degrees: torch.Tensor, translation: torch.Tensor, center: Center
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index-space pull-back maps ``(N, 3, 3), (N, 3)`` of TorchIO-convention LPS parameters."""
    lps = _LPS @ affine.double()
    if center == "world_origin":
        c = torch.zeros(3, dtype=torch.float64)
    elif center == "image":
        mid = (torch.tensor(list(shape), dtype=torch.float64) - 1) / 2
        c = lps[:3, :3] @ mid + lps[:3, 3]
    else:
        raise ValueError(f"image motion: center must be 'image' or 'world_origin', got {center!r}")
    rot = euler_to_matrix(degrees.double())
    return rigid_index_map(lps, rot, translation.double(), c)


def _work_layout(vol: torch.Tensor, phase_axis: int) -> tuple[list[int], bool]:
    """Axis order to work in, and whether the phase axis comes first in it.

    The volume is processed as the C-contiguous array ``vol.permute(perm)`` with the phase axis
    either last (lines along it are rows) or first (planes across it are rows). When the memory
    order of ``vol`` already has the phase axis outermost or innermost (C-ordered arrays, and the
    Fortran-ordered ones nibabel loads) the permuted view is contiguous and nothing is copied.
    """
    mem = sorted(range(3), key=lambda ax: -vol.stride(ax))
    if mem[-1] == phase_axis:
        return mem, False
    if mem[0] == phase_axis:
        return mem, True
    return [ax for ax in range(3) if ax != phase_axis] + [phase_axis], False


def _stitch_segments(
    vol: torch.Tensor,
    move: Any,
    bounds: list[int],
    source: list[int],
    output: Output,
    phase_first: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stitch k-space segments along the phase axis of a C-contiguous volume.

    The phase axis is the last axis of ``vol`` (``(X, Y, L)``), or the first (``(L, X, Y)``) when
    ``phase_first``. ``move(row)`` returns the moved volume of parameter row ``row`` minus ``vol``
    (same shape as ``vol``); it is called once per non-empty moved segment, so only one moved
    volume lives at a time. Spectra are real ``(N, [Re | Im])`` matrices, ``N`` the number of lines
    along the phase axis, computed as ``lines @ [cos | -sin]`` (the faster GEMM orientation). The
    result is written into ``out`` (C-contiguous, shape of ``vol``) when given.
    """
    length = vol.shape[0] if phase_first else vol.shape[-1]
    dev, dt = vol.device, vol.dtype
    flat = vol.reshape(length, -1) if phase_first else vol.reshape(-1, length)  # (L, N) or (N, L)
    lines = flat.T if phase_first else flat  # (N, L) view: one row per line along the phase axis
    res = torch.empty_like(vol) if out is None else out
    dest = res.view(flat.shape)
    half = length // 2
    moved = [(bounds[s], bounds[s + 1], row) for s, row in enumerate(source) if row >= 0 and bounds[s + 1] > bounds[s]]
    if not moved:
        dest.copy_(flat)
        return res

    def spectrum(row: int, freqs: torch.Tensor) -> torch.Tensor:
        """``(N, [Re | Im])`` DFT of moved-minus-unmoved at the signed frequencies ``freqs``."""
        cos, sin = dft_matrices(length, freqs, dev, dt)
        diff = move(row).reshape(flat.shape)
        return torch.mm(diff.T if phase_first else diff, torch.cat([cos, -sin], dim=1))

    if output == "real":
        # Re(IDFT) only needs H(|f|) = G(f) + conj(G(-f)) for f >= 0, and a segment (one-signed: the
        # unmoved segment holds f = 0) adds to H(|f|) exactly its DFT at +|f|: accumulate those
        # into h (N, [Re | Im]) at the columns of the |f| it covers (contiguous)
        # (index bookkeeping on the host: no device synchronisation on a GPU)
        mags = sorted({abs(f - half) for lo, hi, _ in moved for f in range(lo, hi)})
        col = {f: i for i, f in enumerate(mags)}
        na = len(mags)
        h = torch.zeros(lines.shape[0], 2 * na, dtype=dt, device=dev)
        for lo, hi, row in moved:
            fa = sorted(abs(f - half) for f in range(lo, hi))  # contiguous integers
            g = spectrum(row, torch.tensor(fa))
            p0, m = col[fa[0]], len(fa)
            h[:, p0 : p0 + m] += g[:, :m]
            h[:, na + p0 : na + p0 + m] += g[:, m:]
        cos, sin = dft_matrices(length, torch.tensor(mags), dev, dt)
        inv = torch.cat([cos.T, -sin.T], dim=0) / length  # (2A, L)
        if phase_first:
            torch.addmm(flat, inv.T, h.T, out=dest)
        else:
            torch.addmm(flat, h, inv, out=dest)
        return res
    # magnitude: the full complex spectrum of the moved frequencies, each segment's [Re | Im]
    # columns against its own rows of the inverse transform
    parts, invs = [], []
    for lo, hi, row in moved:
        freqs = torch.arange(lo, hi) - half
        parts.append(spectrum(row, freqs))
        cos, sin = dft_matrices(length, freqs, dev, dt)
        invs.append(torch.cat([torch.cat([cos.T, sin.T], 1), torch.cat([-sin.T, cos.T], 1)], 0) / length)
    c = torch.mm(torch.cat(parts, 1), torch.cat(invs, 0))  # (N, 2L)
    real, imag = lines + c[:, :length], c[:, length:]
    mag = torch.sqrt(real * real + imag * imag)
    dest.copy_(mag.T if phase_first else mag)
    return res


def apply_image_motion(
    img: torch.Tensor,
    affine: torch.Tensor,
    degrees: torch.Tensor,
    translation: torch.Tensor,
    times: torch.Tensor,
    phase_axis: int = 2,
    center: Center = "image",
    output: Output = "real",
    resampler: Resampler = "auto",
) -> torch.Tensor:
    """Deterministic image-based motion of a channel-first volume.

    Args:
        img: ``(C, X, Y, Z)`` float tensor (any device); every channel gets the same motion.
        affine: ``(4, 4)`` index-to-RAS affine.
        degrees: ``(N, 3)`` Euler angles (rx, ry, rz) in degrees, LPS axes (TorchIO convention).
        translation: ``(N, 3)`` translations in mm, LPS axes.
        times: ``(N,)`` segment boundary times in (0, 1).
        phase_axis: spatial axis (0, 1 or 2) along which k-space segments are stacked.
        center: rotation centre, ``"image"`` or ``"world_origin"`` (TorchIO's effective centre).
        output: ``"real"`` (TorchIO) or ``"magnitude"``.
        resampler: resampler, see :func:`scripts.motion.resample.resample_rigid`.

    Returns:
        ``(C, X, Y, Z)`` tensor, same dtype and device as ``img``.
    """
    if img.ndim != 4:
        raise ValueError(f"apply_image_motion: expected (C, X, Y, Z), got {tuple(img.shape)}")
    if phase_axis not in (0, 1, 2):
        raise ValueError(f"apply_image_motion: phase_axis must be 0, 1 or 2, got {phase_axis}")
    if output not in ("real", "magnitude"):
        raise ValueError(f"apply_image_motion: output must be 'real' or 'magnitude', got {output!r}")
    degrees = torch.as_tensor(degrees, dtype=torch.float64).reshape(-1, 3)
    translation = torch.as_tensor(translation, dtype=torch.float64).reshape(-1, 3)
    times = torch.as_tensor(times, dtype=torch.float32).reshape(-1)
    if not (degrees.shape[0] == translation.shape[0] == times.shape[0]):
        raise ValueError("apply_image_motion: degrees, translation and times need the same number of positions")
    in_dtype = img.dtype
    work = img.float() if in_dtype not in (torch.float32, torch.float64) else img
    spatial = work.shape[1:]
    a, b = _index_maps(torch.as_tensor(affine), spatial, degrees, translation, center)
    perm, phase_first = _work_layout(work[0], phase_axis)
    pmat = torch.eye(3, dtype=torch.float64)[perm]
    a_p, b_p = pmat @ a @ pmat.T, b @ pmat.T
    bounds, source = segment_layout(times, int(spatial[phase_axis]))
    out = torch.empty_like(work)  # same memory layout as the input
    for ch in range(work.shape[0]):
        vol = work[ch].permute(*perm).contiguous()
        fill = vol.min()

        def move(row: int, vol: torch.Tensor = vol, fill: torch.Tensor = fill) -> torch.Tensor:
            return resample_rigid(vol.unsqueeze(0), a_p[row], b_p[row], fill, resampler, subtract=True)[0]

        target = out[ch].permute(*perm)
        res = _stitch_segments(
            vol, move, bounds, source, output, phase_first, out=target if target.is_contiguous() else None
        )
        if res.data_ptr() != target.data_ptr():
            target.copy_(res)
    return out.to(in_dtype)


class ImageMotion(Transform):
    """Apply a given image-based motion (non-random core of :class:`RandImageMotion`).

    Args: see :func:`apply_image_motion`. The affine comes from the input MetaTensor (identity for a
    plain tensor).
    """

    def __init__(
        self,
        degrees: Any,
        translation: Any,
        times: Any,
        phase_axis: int = 2,
        center: Center = "image",
        output: Output = "real",
        resampler: Resampler = "auto",
    ) -> None:
        self.degrees = torch.as_tensor(degrees, dtype=torch.float32).reshape(-1, 3)
        self.translation = torch.as_tensor(translation, dtype=torch.float32).reshape(-1, 3)
        self.times = torch.as_tensor(times, dtype=torch.float32).reshape(-1)
        self.phase_axis, self.center, self.output, self.resampler = phase_axis, center, output, resampler

    def __call__(self, img: Any) -> Any:
        data, affine = as_volume(img, where="ImageMotion")
        res = apply_image_motion(
            data,
            affine,
            self.degrees,
            self.translation,
            self.times,
            self.phase_axis,
            self.center,
            self.output,
            self.resampler,
        )
        return wrap_like(res, img)


class RandImageMotion(RandomizableTransform):
    """Random image-based motion (TorchIO ``RandomMotion`` distribution), array transform.

    Args:
        prob: probability of applying motion.
        degrees: scalar ``d`` (``U(-d, d)``) or range ``(a, b)`` of the Euler angles in degrees.
        translation: scalar or range of the translations in mm.
        num_transforms: number of moved positions ``N`` (``N + 1`` k-space segments).
        phase_axis: spatial axis of the segments (0, 1, 2), or a sequence of axes to draw from per call.
        center: ``"image"`` or ``"world_origin"`` (TorchIO's effective centre).
        output: ``"real"`` (TorchIO) or ``"magnitude"``.
        severity: optional preset name of :data:`IMAGE_MOTION_PRESETS`; overrides the three ranges.
        resampler: resampler.
    """

    def __init__(
        self,
        prob: float = 0.5,
        degrees: float | Sequence[float] = 10.0,
        translation: float | Sequence[float] = 10.0,
        num_transforms: int = 2,
        phase_axis: int | Sequence[int] = 2,
        center: Center = "image",
        output: Output = "real",
        severity: str | None = None,
        resampler: Resampler = "auto",
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        if severity is not None:
            if severity not in IMAGE_MOTION_PRESETS:
                raise ValueError(
                    f"RandImageMotion: unknown severity {severity!r}; use one of {list(IMAGE_MOTION_PRESETS)}"
                )
            preset = IMAGE_MOTION_PRESETS[severity]
            degrees, translation, num_transforms = preset["degrees"], preset["translation"], preset["num_transforms"]
        if not isinstance(num_transforms, (int, np.integer)) or num_transforms < 1:
            raise ValueError(f"RandImageMotion: num_transforms must be a positive integer, got {num_transforms!r}")
        self.degrees = parse_range(degrees, "degrees")
        self.translation = parse_range(translation, "translation")
        self.num_transforms = int(num_transforms)
        self.phase_axes = parse_phase_axes(phase_axis, "RandImageMotion")
        self.center, self.output, self.resampler = center, output, resampler
        self._params: dict[str, torch.Tensor] | None = None
        self._axis = self.phase_axes[0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._params = sample_image_motion_params(self.R, self.degrees, self.translation, self.num_transforms)
        self._axis = draw_phase_axis(self.R, self.phase_axes)

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        if self._params is None:
            raise RuntimeError("RandImageMotion: call randomize() before __call__(randomize=False)")
        data, affine = as_volume(img, where="RandImageMotion")
        p = self._params
        res = apply_image_motion(
            data,
            affine,
            p["degrees"],
            p["translation"],
            p["times"],
            self._axis,
            self.center,
            self.output,
            self.resampler,
        )
        return wrap_like(res, img)

    def last_params(self, img: Any = None) -> dict[str, torch.Tensor]:
        """The drawn parameters (float32 tensors) and ``phase_axis``."""
        assert self._params is not None
        return {k: v.clone() for k, v in self._params.items()} | {"phase_axis": torch.tensor(float(self._axis))}

    def zero_params(self, img: Any = None) -> dict[str, torch.Tensor]:
        n = self.num_transforms
        return {
            "degrees": torch.zeros(n, 3),
            "translation": torch.zeros(n, 3),
            "times": torch.zeros(n),
            "phase_axis": torch.tensor(-1.0),
        }

    def last_course(self, img: Any) -> torch.Tensor:
        assert self._params is not None
        length = int(torch.as_tensor(img).shape[1 + self._axis])
        p = self._params
        return image_motion_course(p["degrees"], p["translation"], p["times"], length)


class RandImageMotiond(RandMotionDictBase):
    """Dictionary version of :class:`RandImageMotion`; sets ``label_key`` to 1 when applied.

    Args:
        keys: image keys (same motion for all).
        label_key, prob, params_key, metrics_key, allow_missing_keys: see
            :class:`scripts.motion.base.RandMotionDictBase`. ``params_key`` stores ``degrees (N, 3)``,
            ``translation (N, 3)``, ``times (N,)``, ``phase_axis`` and ``applied``.
        **kwargs: arguments of :class:`RandImageMotion` (except ``prob``).
    """

    array_class = RandImageMotion
