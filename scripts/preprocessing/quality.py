"""Does an image on the t1-linear grid look like a T1w brain? One measure, used by t1-linear
preprocessing (is the registration plausible?) and by the QC job (``not_brain``).

The measure is the Pearson correlation with the MNI template inside the template's brain mask,
**after Gaussian smoothing of both images** (``sigma_mm``). Motion adds ghosts, ringing and blur:
detail at the scale of a few millimetres that drags a voxel-wise correlation down (a real moved head
scored 0.3 against 0.6 clean). Smoothed, what is left is the layout of the head (where the brain,
ventricles and CSF are), which motion does not change but a failed registration, another body part,
an inverted contrast or noise do. Thresholds are calibrated in docs/gates.md
(``tests/benchmarks/bench_gates.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scripts.common.grid import grid_voxel as _grid_voxel

__all__ = ["SIGMA_MM", "BrainEvidence", "BrainGate", "template_on_grid", "template_similarity", "brain_evidence"]

#: smoothing of image and template before the correlation (mm)
SIGMA_MM = 6.0


def template_on_grid(spatial_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template intensities, brain mask and a 4-12 mm shell outside the brain on a grid sampling the
    t1-linear box with ``spatial_size`` voxels (exact sub-grid when the voxel is an integer, cached)."""
    return _template_on_grid(tuple(int(s) for s in spatial_size))  # a list works too


@functools.lru_cache(maxsize=4)
def _template_on_grid(key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    from scripts.preprocessing.template import template_on_crop_grid

    template, mask = template_on_crop_grid()
    voxel = _grid_voxel(key)
    step = int(round(voxel))
    if abs(voxel - step) < 1e-6 and tuple(template[::step, ::step, ::step].shape) == key:
        template, mask = template[::step, ::step, ::step].astype(np.float32), mask[::step, ::step, ::step]
    else:
        coords = np.meshgrid(*[np.arange(n) * voxel for n in key], indexing="ij")
        template = ndimage.map_coordinates(template, coords, order=1, mode="constant").astype(np.float32)
        mask = ndimage.map_coordinates(mask.astype(np.float32), coords, order=0, mode="constant") > 0.5
    dist = ndimage.distance_transform_edt(~mask, sampling=voxel)
    return template, mask, (dist >= 4.0) & (dist <= 12.0)


def _unit(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    v -= v.mean()
    norm = float(np.sqrt((v * v).sum()))
    return v / norm if norm > 0 else v


#: fine grids are smoothed on this coarser sub-grid (same result within 0.01, 5x faster at 1 mm)
_COARSE_MM = 2.0


def _smooth(array: np.ndarray, sigma_mm: float) -> np.ndarray:
    """``array`` (on a t1-linear grid) smoothed by a Gaussian of ``sigma_mm``; when the grid is finer
    than 2 mm and the 2 mm grid is a sub-grid of it, the result is on that 2 mm grid (anti-aliased)."""
    from scipy import ndimage

    img = np.asarray(array, dtype=np.float32)
    voxel = _grid_voxel(img.shape)
    if sigma_mm <= 0:
        return img
    step = int(round(_COARSE_MM / voxel))
    if step >= 2 and abs(step * voxel - _COARSE_MM) < 1e-6 and sigma_mm > _COARSE_MM:
        from scripts.common.grid import t1_linear_grid

        coarse = img[::step, ::step, ::step]
        if coarse.shape == t1_linear_grid(_COARSE_MM)[0]:
            pre = 0.5 * _COARSE_MM  # anti-aliasing before the sub-sampling, the rest of sigma after it
            coarse = ndimage.gaussian_filter(img, pre / voxel, truncate=3.0)[::step, ::step, ::step]
            return ndimage.gaussian_filter(coarse, np.sqrt(sigma_mm**2 - pre**2) / _COARSE_MM)
    return ndimage.gaussian_filter(img, sigma_mm / voxel)


@functools.lru_cache(maxsize=4)
def _smoothed_templates(spatial_size: tuple[int, ...], sigma_mm: float) -> tuple[np.ndarray, list, np.ndarray]:
    """(unit template vector inside the mask, the same for the template flipped top-bottom and
    front-back, the mask) on the grid :func:`_smooth` gives: the references of :func:`brain_evidence`."""
    template, _, _ = template_on_grid(spatial_size)
    smooth = _smooth(template, sigma_mm)
    _, mask, _ = template_on_grid(smooth.shape)
    flips = [_unit(np.flip(smooth, axis)[mask]) for axis in (1, 2)]
    return _unit(smooth[mask]), flips, mask


def _smoothed_in_mask(array: np.ndarray, sigma_mm: float) -> tuple[np.ndarray, np.ndarray]:
    _, _, mask = _smoothed_templates(tuple(int(s) for s in array.shape), float(sigma_mm))
    return _unit(_smooth(array, sigma_mm)[mask]), mask


def template_similarity(array: np.ndarray, sigma_mm: float = SIGMA_MM) -> float:
    """Correlation of ``array`` (an image on a t1-linear grid) with the template inside its brain
    mask, both smoothed by ``sigma_mm`` (0: voxel-wise). 1 for the template itself; 0 for a constant."""
    a, _ = _smoothed_in_mask(array, sigma_mm)
    ref, _, _ = _smoothed_templates(tuple(int(s) for s in array.shape), float(sigma_mm))
    return float((a * ref).sum())


@dataclass(frozen=True)
class BrainEvidence:
    """What :func:`brain_evidence` measured on one image.

    Attributes:
        similarity: smoothed correlation with the template inside its brain mask.
        flipped_similarity: the best smoothed correlation with the template flipped top-bottom or
            front-back (above ``similarity``: the head is not in t1-linear orientation).
        distinct_values: distinct intensities inside the brain mask, counted up to 64 (a label map
            has a handful).
    """

    similarity: float
    flipped_similarity: float
    distinct_values: int


def brain_evidence(array: np.ndarray, sigma_mm: float = SIGMA_MM) -> BrainEvidence:
    """Measure how much ``array`` (an image on a t1-linear grid) looks like a T1w brain in that space."""
    shape = tuple(int(s) for s in array.shape)
    a, _ = _smoothed_in_mask(array, sigma_mm)
    ref, flips, _ = _smoothed_templates(shape, float(sigma_mm))
    _, mask, _ = template_on_grid(shape)
    values = np.unique(np.asarray(array)[mask][:: max(1, int(mask.sum()) // 200_000)])
    return BrainEvidence(
        similarity=float((a * ref).sum()),
        flipped_similarity=max(float((a * f).sum()) for f in flips),
        distinct_values=int(min(len(values), 64)),
    )


@dataclass(frozen=True)
class BrainGate:
    """The "is this a T1w brain in t1-linear space?" decision, calibrated in docs/gates.md.

    ``check`` returns ``("ok", "")``, ``("doubtful", reason)`` (score it, with a warning) or
    ``("not_brain", reason)`` (refuse). Refused: a similarity under ``refuse_below``, a better fit of
    the flipped template (by more than ``flip_margin``), or at most ``max_label_values`` distinct
    intensities (a label map or an almost empty image).
    Doubtful: a similarity under ``doubt_below``.
    """

    refuse_below: float = 0.4
    doubt_below: float = 0.5
    sigma_mm: float = SIGMA_MM
    max_label_values: int = 16
    flip_margin: float = 0.05

    def check(self, array: np.ndarray) -> tuple[str, str, BrainEvidence]:
        """``(verdict, reason, evidence)`` for an image on a t1-linear grid; the first rule that applies wins."""
        e = brain_evidence(array, self.sigma_mm)
        what = f"smoothed ({self.sigma_mm:g} mm) correlation with the MNI template {e.similarity:.2f}"
        rules = (
            (
                e.distinct_values <= self.max_label_values,
                "not_brain",
                f"only {e.distinct_values} distinct intensities inside the brain: a label map or an almost empty "
                "image, not a scan",
            ),
            (
                e.similarity < self.refuse_below,
                "not_brain",
                f"{what} < {self.refuse_below:g}: not a T1w brain in t1-linear space",
            ),
            (
                e.flipped_similarity > e.similarity + self.flip_margin,
                "not_brain",
                f"{what} < {e.flipped_similarity:.2f} with the template flipped: the head is upside down or back to "
                "front",
            ),
            (
                e.similarity < self.doubt_below,
                "doubtful",
                f"{what} < {self.doubt_below:g}: check that this is a T1w brain",
            ),
        )
        verdict, reason = next(((v, r) for applies, v, r in rules if applies), ("ok", ""))
        return verdict, reason, e
