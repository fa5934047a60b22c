"""Image-quality metrics (MRQy's definitions) and a random-forest motion baseline.

The journal paper (Loizillon et al.) compares its CNN with a random forest trained on the image
quality metrics (IQMs) of MRQy. This module provides

* :func:`volume_iqms` -- the 15 MRQy IQMs of one 3-D volume, computed on axial slices (array axis 2)
  and averaged over slices. All slices are processed at once with numpy (no per-slice Python loop
  except the convex hull, which is a few hundred microseconds per slice).
* :func:`volume_iqms_reference` -- a slow, literal per-slice implementation with scikit-image
  (``threshold_otsu``, ``equalize_hist``, ``convex_hull_image``, ``median``) and scipy, used by the
  tests and the benchmark to check the vectorised version.
* :func:`compute_iqm_table` -- IQMs of many NIfTI files, in parallel, with a TSV cache keyed by
  path, file size and modification time.
* :class:`IQMBaseline` -- IQMs for a datalist -> ``RandomForestClassifier`` tuned by
  ``RandomizedSearchCV`` (stratified, participant-grouped K-fold, balanced accuracy) -> predictions
  on the test split in the same CSV format as the CNN's evaluation, plus ``metrics.json``.

Compare the forest with the CNN on the same test images with
:func:`scripts.metrics.mcnemar_files` (``configs/mcnemar.yaml``).

Per-slice definitions (``f``/``b``: foreground/background values; ``F = C * img``, ``B = (1 - C) *
img`` with ``C`` the convex-hull foreground; ``P_X``: a 5x5 patch at the maximum of ``X``):

=====  ===================================================================
MEAN   mean(f)
RNG    max(f) - min(f)
VAR    var(f)
CV     100 * std(f) / mean(f)
CPP    mean of F convolved ('same', zero padded) with [[-1/8]*3, [-1/8, 1, -1/8], [-1/8]*3]
PSNR   20 log10(max F / RMSE(F, median5x5(F)))
SNR1   std(f) / std(b)
SNR2   mean(P_F) / std(b)
SNR3   mean(P_F) / std(P_F)
SNR4   mean(P_F) / std(P_B)
CNR    mean(P_F - P_B) / std(P_B)
CVP    std(P_F) / mean(P_F)
CJV    (std(f) + std(b)) / |mean(f) - mean(b)|
EFC    sum(x ln x) / E_max, x = |F| / sqrt(sum F^2), E_max = -sqrt(n) ln(n) / 2 (n pixels)
FBER   median(f^2) / median(b^2); 0 when the denominator is < 1e-3 (MRQy's rule)
=====  ===================================================================

Standard deviations are population (``ddof=0``) as in MRQy. MRQy's known quirks are reproduced only
with ``mrqy_compatible=True``: EFC's ``+1e16`` (instead of 1e-16) with ``1/|E_max|``; PSNR's mixed
scales (raw ``F`` against ``median(F / max F)``); the patch ``P_X`` taken up-left of the maximum
(rows/cols ``a-5 .. a-1``) instead of centred on it; and a foreground that depends on the intensity
scale (the raw slice is added to its equalised version; by default the slice is first rescaled to
[0, 255]). See docs/iqm_baseline.md.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from scripts.common.files import atomic_write
from scripts.metrics import binary_metrics

__all__ = [
    "IQM_NAMES",
    "DEFAULT_IQMS",
    "foreground_masks",
    "slice_iqms",
    "volume_iqms",
    "volume_iqms_reference",
    "load_volume",
    "compute_iqm_table",
    "read_iqm_table",
    "default_param_distributions",
    "make_search",
    "IQMBaseline",
    "write_predictions",
]

logger = logging.getLogger(__name__)

#: All IQMs computed by MRQy (in MRQy's order).
IQM_NAMES: tuple[str, ...] = (
    "MEAN", "RNG", "VAR", "CV", "CPP", "PSNR", "SNR1", "SNR2", "SNR3", "SNR4", "CNR", "CVP", "CJV", "EFC", "FBER",
)  # fmt: skip

#: The 13 IQMs used by the baseline by default: all but MEAN and RNG, which measure the raw intensity
#: level/span of the scanner rather than image quality (see docs/iqm_baseline.md).
DEFAULT_IQMS: tuple[str, ...] = tuple(n for n in IQM_NAMES if n not in ("MEAN", "RNG"))

_NBINS = 256
_FBER_MIN_DENOMINATOR = 1e-3
_PRED_COLUMNS = ("image", "participant_id", "session_id", "label", "prob_motion", "prediction")


# --------------------------------------------------------------------------------------------------
# foreground
# --------------------------------------------------------------------------------------------------
def _batched_histogram(x: np.ndarray, nbins: int = _NBINS) -> tuple[np.ndarray, ...]:
    """256-bin histograms of each row of ``x`` over the row's [min, max] (scikit-image's float rule).

    Args:
        x: (S, N) values, one row per slice.

    Returns:
        counts (S, nbins), bin centres (S, nbins), position of each value in bin units from the row
        minimum (S, N; value ``t`` lies in bin ``floor(t)``), row minimum (S,), bin width (S,; 0 for
        constant rows).
    """
    n_rows = x.shape[0]
    lo = x.min(axis=1)
    width = (x.max(axis=1) - lo) / nbins
    inv = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 0.0)
    pos = (x - lo[:, None]) * inv[:, None]
    idx = np.minimum(pos.astype(np.int64), nbins - 1)
    # np.histogram's correction for values that rounding put in a neighbouring bin (edges as np.linspace);
    # only values within rounding distance of an edge can be affected
    frac = pos - np.floor(pos)
    near = np.nonzero(((frac < 1e-6) & (pos > 0)) | (frac > 1.0 - 1e-6))
    if near[0].size:
        r, v = near[0], x[near]
        k = idx[near]
        k -= v < lo[r] + k * width[r]
        k += (v >= lo[r] + (k + 1) * width[r]) & (k != nbins - 1)
        idx[near] = np.clip(k, 0, nbins - 1)
    idx += (np.arange(n_rows, dtype=np.int64) * nbins)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n_rows * nbins).reshape(n_rows, nbins).astype(np.float64)
    # bin centres exactly as scikit-image computes them from np.histogram's np.linspace edges
    edges = np.arange(nbins + 1)[None, :] * width[:, None] + lo[:, None]
    edges[:, -1] = x.max(axis=1)
    centres = (edges[:, :-1] + edges[:, 1:]) / 2.0
    return counts, centres, pos, lo, width


def _batched_otsu(x: np.ndarray, hist: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Otsu threshold of each row of ``x`` (S, N), as ``skimage.filters.threshold_otsu`` (256 bins).

    A constant row gets its value as threshold (so ``x > t`` is empty), as in scikit-image.
    """
    counts, centres, _, lo, width = _batched_histogram(x) if hist is None else hist
    counts = counts.astype(np.float32)  # scikit-image's dtypes, so that near-ties break the same way
    w1 = np.cumsum(counts, axis=1)
    w2 = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    cw = counts * centres
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.cumsum(cw, axis=1) / w1
        m2 = np.cumsum(cw[:, ::-1], axis=1)[:, ::-1] / w2
        var12 = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    var12 = np.nan_to_num(var12, nan=-1.0)
    best = np.argmax(var12, axis=1)
    thr = centres[np.arange(x.shape[0]), best]
    return np.where(width > 0, thr, lo)


def _batched_equalize(x: np.ndarray, hist: tuple[np.ndarray, ...]) -> np.ndarray:
    """Histogram equalisation of each row, as ``skimage.exposure.equalize_hist`` (values in [0, 1]).

    The normalised cumulative histogram is interpolated linearly at each value between bin centres,
    with ``np.interp``'s formula and clamping, so that the result is the same to the last bit.
    Constant rows map to 1 (scikit-image gives 0.5; either way such a slice has no foreground).

    Args:
        x: (S, N) values.
        hist: the output of :func:`_batched_histogram` for ``x``.
    """
    counts, centres, pos, _, width = hist
    n_rows, nbins = counts.shape
    cdf = np.cumsum(counts, axis=1)
    cdf /= cdf[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = np.diff(cdf, axis=1) / np.diff(centres, axis=1)  # (S, nbins - 1)
    # interval j with centres[j] <= x < centres[j + 1]: guess from the bin position, then correct
    off = (np.arange(n_rows, dtype=np.int64) * nbins)[:, None]
    j = np.clip(np.floor(pos - 0.5).astype(np.int64), 0, nbins - 2) + off
    flat_c = centres.ravel()
    j -= (x < flat_c[j]) & (j > off)
    j += (x >= flat_c[j + 1]) & (j < off + nbins - 2)
    flat_slopes = np.concatenate([slopes, np.zeros((n_rows, 1))], axis=1).ravel()
    flat_cdf = cdf.ravel()
    out = flat_slopes[j] * (x - flat_c[j]) + flat_cdf[j]
    out = np.where(x >= centres[:, -1:], cdf[:, -1:], out)
    out = np.where(x < centres[:, :1], cdf[:, :1], out)
    out[width == 0] = 1.0
    return out


def _convex_hull_2d(mask: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Convex hull image of a 2-D mask, equal to ``skimage.morphology.convex_hull_image(mask)``.

    The hull is that of the pixel-edge midpoints (centre +- 0.5 along each axis) of the leftmost and
    rightmost pixel of each row (the other pixels lie inside it); a pixel belongs to the result when its
    centre is inside the hull or on its border. An empty mask gives an empty result.
    """
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros_like(mask, dtype=bool)
    sub = mask[rows]
    left = sub.argmax(axis=1)
    right = width - 1 - sub[:, ::-1].argmax(axis=1)
    ends = np.concatenate([np.stack([rows, left], 1), np.stack([rows, right], 1)]).astype(np.float64)
    offsets = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])
    pts = np.unique((ends[:, None, :] + offsets[None]).reshape(-1, 2), axis=0)
    eq = ConvexHull(pts).equations  # a*r + b*c + d <= 0 inside; always 2-D thanks to the offsets
    a, b, d = eq[:, 0], eq[:, 1], eq[:, 2]
    r = np.arange(height, dtype=np.float64)[:, None]
    rhs = tol - d[None, :] - a[None, :] * r  # (H, n_facets): b * c <= rhs
    vertical = np.abs(b) < 1e-12
    row_ok = np.all(np.where(vertical[None, :], rhs >= 0, True), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / np.where(vertical, 1.0, b)[None, :]
    cmax = np.min(np.where((b > 0) & ~vertical, bound, np.inf), axis=1)
    cmin = np.max(np.where((b < 0) & ~vertical, bound, -np.inf), axis=1)
    c = np.arange(width, dtype=np.float64)[None, :]
    return row_ok[:, None] & (c >= cmin[:, None]) & (c <= cmax[:, None])


def foreground_masks(slices: np.ndarray, mrqy_compatible: bool = False) -> np.ndarray:
    """MRQy's per-slice foreground: Otsu on the image and on its equalised version, combined, hull.

    For each slice: ``h = 255 * equalize_hist(img)``; ``w1 = mean(img > otsu(img))``,
    ``w2 = mean(h > otsu(h))``; ``new = w1 * img' + w2 * h``; foreground = convex hull of
    ``new > otsu(new)``. MRQy uses the raw image as ``img'``, so the mask changes when the intensities are
    multiplied by a constant (raw intensities in the thousands outweigh ``h``, images in [0, 1] are
    outweighed by it). By default ``img'`` is the slice min-max rescaled to [0, 255], the range of ``h``,
    which makes the mask independent of the intensity scale; ``mrqy_compatible=True`` uses the raw slice.

    Args:
        slices: (S, H, W) float array of S 2-D slices.
        mrqy_compatible: combine the raw image (MRQy) instead of the rescaled one.

    Returns:
        (S, H, W) bool foreground masks (empty for a constant slice).
    """
    n, height, width = slices.shape
    x = slices.reshape(n, -1).astype(np.float64, copy=False)
    hist = _batched_histogram(x)
    o_img = x > _batched_otsu(x, hist)[:, None]
    h = 255.0 * _batched_equalize(x, hist)
    o_h = h > _batched_otsu(h)[:, None]
    if mrqy_compatible:
        x_c = x
    else:
        lo, span = hist[3], hist[4] * _NBINS
        x_c = (x - lo[:, None]) / np.where(span > 0, span, 1.0)[:, None] * 255.0
    new = o_img.mean(axis=1)[:, None] * x_c + o_h.mean(axis=1)[:, None] * h
    mask = (new > _batched_otsu(new)[:, None]).reshape(n, height, width)
    return np.stack([_convex_hull_2d(m) for m in mask]) if n else mask


# --------------------------------------------------------------------------------------------------
# IQMs
# --------------------------------------------------------------------------------------------------
def _patches(x: np.ndarray, mrqy_compatible: bool) -> np.ndarray:
    """5x5 patch of each slice of ``x`` (S, H, W) at its (first, row-major) maximum, zero padded.

    Centred on the maximum by default; MRQy's up-left window (rows a-5..a-1, cols b-5..b-1) when
    ``mrqy_compatible``.
    """
    n, _, width = x.shape
    arg = x.reshape(n, -1).argmax(axis=1)
    a, b = arg // width, arg % width
    xp = np.pad(x, ((0, 0), (5, 5), (5, 5)))
    start = 0 if mrqy_compatible else 3  # padded coordinates: a + 0 = original a - 5; a + 3 = a - 2
    k = np.arange(5)
    rr = (a + start)[:, None, None] + k[None, :, None]
    cc = (b + start)[:, None, None] + k[None, None, :]
    return xp[np.arange(n)[:, None, None], rr, cc]


def _median_5x5(x: np.ndarray, fg: np.ndarray, chunk: int = 8) -> np.ndarray:
    """5x5 in-plane median of each slice of ``x`` (S, H, W), mode 'nearest' (``skimage.filters.median``).

    ``x`` must be zero outside ``fg``: the filter then runs only on the bounding box of ``fg`` grown by
    2 pixels, which gives the same result as on the whole slice (outside, the median of zeros is 0).
    Implemented as a partial sort (``np.partition``) of the 25 neighbours, ``chunk`` slices at a time.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    out = np.zeros_like(x)
    if not fg.any():
        return out
    r0, r1 = np.flatnonzero(fg.any(axis=(0, 2)))[[0, -1]]
    c0, c1 = np.flatnonzero(fg.any(axis=(0, 1)))[[0, -1]]
    r0, c0 = max(r0 - 2, 0), max(c0 - 2, 0)
    r1, c1 = min(r1 + 3, x.shape[1]), min(c1 + 3, x.shape[2])
    # float32 halves the memory traffic; the median of float32-representable values is exact in float32
    crop = x[:, r0:r1, c0:c1]
    exact32 = x.dtype == np.float32 or np.array_equal(crop, crop.astype(np.float32))
    padded = np.pad(crop.astype(np.float32) if exact32 else crop, ((0, 0), (2, 2), (2, 2)), mode="edge")
    for s in range(0, x.shape[0], chunk):
        win = sliding_window_view(padded[s : s + chunk], (5, 5), axis=(1, 2))
        win = win.reshape(*win.shape[:3], 25)
        out[s : s + chunk, r0:r1, c0:c1] = np.partition(win, 12, axis=-1)[..., 12]
    return out


def _masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of ``values[s][mask[s]]`` for each slice s (NaN where the mask is empty)."""
    out = np.full(values.shape[0], np.nan)
    for s, (v, m) in enumerate(zip(values, mask)):
        sel = v[m]
        if sel.size:
            out[s] = np.median(sel)
    return out


def slice_iqms(
    slices: np.ndarray, fg: np.ndarray | None = None, mrqy_compatible: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The 15 IQMs of each 2-D slice.

    Args:
        slices: (S, H, W) float image slices (raw intensities).
        fg: (S, H, W) bool foreground masks; computed with :func:`foreground_masks` when None.
        mrqy_compatible: reproduce MRQy's quirks (scale-dependent foreground, EFC ``+1e16``, PSNR mixed
            scales, up-left patches).

    Returns:
        values (S, 15) float64 in the order of :data:`IQM_NAMES` (non-finite values set to NaN), and
        ``kept`` (S,) bool: slices with ``std(F) > 0``, the only ones MRQy averages.
    """
    img = np.asarray(slices, dtype=np.float64)
    if fg is None:
        fg = foreground_masks(img, mrqy_compatible)
    n, height, width = img.shape
    npix = height * width
    bg = ~fg
    big_f = img * fg
    big_b = img - big_f
    flat_f, flat_b = big_f.reshape(n, -1), big_b.reshape(n, -1)
    kept = flat_f.std(axis=1) > 0
    n_f = np.count_nonzero(fg.reshape(n, -1), axis=1).astype(np.float64)
    n_b = npix - n_f
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_f = flat_f.sum(axis=1) / n_f
        mean_b = flat_b.sum(axis=1) / n_b
        dev = img - np.where(fg, mean_f[:, None, None], mean_b[:, None, None])
        dev *= dev
        var_f = (dev * fg).reshape(n, -1).sum(axis=1) / n_f
        var_b = (dev * bg).reshape(n, -1).sum(axis=1) / n_b
        std_f, std_b = np.sqrt(var_f), np.sqrt(var_b)
        masked = np.where(fg, img, np.nan).reshape(n, -1)
        rng = np.fmax.reduce(masked, axis=1) - np.fmin.reduce(masked, axis=1)
        # CPP: summing a 'same' zero-padded convolution with a kernel whose weights add up to 0 leaves only
        # the border pixels, each weighted by 1 - (number of in-slice neighbours) / 8.
        nn = ndimage.convolve(np.ones((height, width)), np.ones((3, 3)), mode="constant") - 1.0
        border = nn < 8
        cpp = (big_f[:, border] * (1.0 - nn[border] / 8.0)).sum(axis=1) / npix
        # PSNR
        max_f = flat_f.max(axis=1)
        med = _median_5x5(big_f, fg)
        if mrqy_compatible:
            med /= max_f[:, None, None]
        med -= big_f
        med *= med
        rmse = np.sqrt(med.reshape(n, -1).mean(axis=1))
        psnr = 20.0 * np.log10(max_f / rmse)
        # patches
        p_f = _patches(big_f, mrqy_compatible).reshape(n, -1)
        p_b = _patches(big_b, mrqy_compatible).reshape(n, -1)
        pf_mean, pf_std, pb_std = p_f.mean(axis=1), p_f.std(axis=1), p_b.std(axis=1)
        snr1 = std_f / std_b
        snr2 = pf_mean / std_b
        snr3 = pf_mean / pf_std
        snr4 = pf_mean / pb_std
        cnr = (p_f - p_b).mean(axis=1) / pb_std
        cvp = pf_std / pf_mean
        cjv = (std_f + std_b) / np.abs(mean_f - mean_b)
        # EFC
        e_max = npix * (1.0 / np.sqrt(npix)) * np.log(1.0 / np.sqrt(npix))
        b_max = np.sqrt(np.einsum("ij,ij->i", flat_f, flat_f))[:, None]
        if mrqy_compatible:
            efc = np.sum((flat_f / b_max) * np.log((flat_f + 1e16) / b_max), axis=1) / abs(e_max)
        else:
            xn = np.abs(flat_f) / b_max
            efc = np.sum(xn * np.log(xn + 1e-16), axis=1) / e_max
        # FBER
        sq = img * img
        num = _masked_median(sq, fg)
        den = _masked_median(sq, bg)
        fber = np.where(den < _FBER_MIN_DENOMINATOR, 0.0, num / den)
    values = np.stack(
        [mean_f, rng, var_f, 100.0 * std_f / mean_f, cpp, psnr, snr1, snr2, snr3, snr4, cnr, cvp, cjv, efc, fber],
        axis=1,
    )
    values[~np.isfinite(values)] = np.nan
    return values, kept


def _select_slices(volume: np.ndarray, slice_step: int, skip_first_slice: bool) -> np.ndarray:
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}.")
    if slice_step < 1:
        raise ValueError(f"slice_step must be >= 1, got {slice_step}.")
    start = 1 if skip_first_slice else 0
    return np.moveaxis(volume[:, :, start::slice_step], 2, 0)


def _average(values: np.ndarray, kept: np.ndarray, name: str) -> dict[str, float]:
    v = values[kept]
    if v.shape[0] == 0:
        warnings.warn(f"{name}: no foreground found in any slice; its IQMs are NaN.", RuntimeWarning, stacklevel=3)
        return {k: float("nan") for k in IQM_NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(v, axis=0)
    return {k: float(m) for k, m in zip(IQM_NAMES, mean)}


def volume_iqms(
    volume: np.ndarray,
    slice_step: int = 1,
    mrqy_compatible: bool = False,
    skip_first_slice: bool = True,
    name: str = "volume",
    chunk: int = 16,
) -> dict[str, float]:
    """The 15 MRQy IQMs of a 3-D volume: per-slice values averaged over slices.

    Slices are taken along array axis 2 (axial for t1-linear), starting at slice 1 as MRQy does
    (``skip_first_slice``), every ``slice_step`` slices. Slices with ``std(F) == 0`` are ignored; a
    measure that is NaN/Inf on a slice is ignored for that slice. When no slice has a foreground all
    values are NaN and a ``RuntimeWarning`` names the volume.

    Args:
        volume: (X, Y, Z) array of raw intensities.
        slice_step: MRQy's ``-b`` sampling step.
        mrqy_compatible: reproduce MRQy's quirks (see module docstring).
        skip_first_slice: skip slice 0 as MRQy does.
        name: used in warnings (e.g. the file path).
        chunk: slices processed together (bounds the memory: about 2.5 MB per 169 x 208 slice).

    Returns:
        {IQM name: value} for all names of :data:`IQM_NAMES`.
    """
    slices = _select_slices(np.asarray(volume), slice_step, skip_first_slice)
    parts = [
        slice_iqms(slices[s : s + chunk].astype(np.float64), mrqy_compatible=mrqy_compatible)
        for s in range(0, slices.shape[0], chunk)
    ]
    values = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, len(IQM_NAMES)))
    kept = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool)
    return _average(values, kept, name)


# --------------------------------------------------------------------------------------------------
# literal reference implementation (slow), for tests and the benchmark
# --------------------------------------------------------------------------------------------------
def _reference_slice(img: np.ndarray, mrqy_compatible: bool) -> tuple[np.ndarray, bool]:
    from scipy.signal import convolve2d
    from skimage.exposure import equalize_hist
    from skimage.filters import median, threshold_otsu
    from skimage.morphology import convex_hull_image

    warnings.simplefilter("ignore", RuntimeWarning)  # empty f or b: NaN, dropped like MRQy does
    h = equalize_hist(img) * 255
    o_i, o_h = img > threshold_otsu(img), h > threshold_otsu(h)
    span = img.max() - img.min()
    img_c = img if mrqy_compatible else (img - img.min()) / (span if span > 0 else 1.0) * 255
    new = np.mean(o_i) * img_c + np.mean(o_h) * h
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        c = convex_hull_image(new > threshold_otsu(new))
    big_f, big_b = c * img, (1 - c) * img
    f, b = img[c], img[~c]
    kept = bool(np.std(big_f) > 0)

    def patch(x: np.ndarray) -> np.ndarray:
        a, bb = np.unravel_index(np.argmax(x), x.shape)
        u = np.pad(x, 5)
        s = 0 if mrqy_compatible else 3
        return u[a + s : a + s + 5, bb + s : bb + s + 5]

    p_f, p_b = patch(big_f), patch(big_b)
    kernel = -np.ones((3, 3)) / 8.0
    kernel[1, 1] = 1.0
    n = img.size
    e_max = n * (1.0 / np.sqrt(n)) * np.log(1.0 / np.sqrt(n))
    b_max = np.sqrt(np.sum(big_f**2))
    with np.errstate(divide="ignore", invalid="ignore"):
        if mrqy_compatible:
            i_hat = median(big_f / np.max(big_f), np.ones((5, 5)))
            efc = np.sum((big_f / b_max) * np.log((big_f + 1e16) / b_max)) / abs(e_max)
        else:
            i_hat = median(big_f, np.ones((5, 5)))
            xn = np.abs(big_f) / b_max
            efc = np.sum(xn * np.log(xn + 1e-16)) / e_max
        psnr = 20 * np.log10(np.max(big_f) / np.sqrt(np.mean((big_f - i_hat) ** 2)))
        den = np.median(b**2) if b.size else np.nan
        fber = 0.0 if den < _FBER_MIN_DENOMINATOR else np.median(f**2) / den
        vals = [
            np.mean(f), np.ptp(f) if f.size else np.nan, np.var(f), 100 * np.std(f) / np.mean(f),
            np.mean(convolve2d(big_f, kernel, mode="same")), psnr,
            np.std(f) / np.std(b), np.mean(p_f) / np.std(b), np.mean(p_f) / np.std(p_f - np.mean(p_f)),
            np.mean(p_f) / np.std(p_b), np.mean(p_f - p_b) / np.std(p_b), np.std(p_f) / np.mean(p_f),
            (np.std(f) + np.std(b)) / abs(np.mean(f) - np.mean(b)), efc, fber,
        ]  # fmt: skip
    out = np.array(vals, dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out, kept


def volume_iqms_reference(
    volume: np.ndarray, slice_step: int = 1, mrqy_compatible: bool = False, skip_first_slice: bool = True
) -> dict[str, float]:
    """Slow per-slice implementation of :func:`volume_iqms` with scikit-image's own functions.

    Written literally from the definitions (one slice at a time); used to check the vectorised code.
    """
    slices = _select_slices(np.asarray(volume), slice_step, skip_first_slice).astype(np.float64)
    res = [_reference_slice(s, mrqy_compatible) for s in slices]
    values = np.array([r[0] for r in res]).reshape(-1, len(IQM_NAMES))
    kept = np.array([r[1] for r in res], dtype=bool)
    return _average(values, kept, "volume")


# --------------------------------------------------------------------------------------------------
# files and the cached IQM table
# --------------------------------------------------------------------------------------------------
def load_volume(path: str) -> np.ndarray:
    """Read a 3-D NIfTI volume as float32 (X, Y, Z), scaling applied.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it cannot be read as NIfTI or is not 3-D (a trailing singleton axis is dropped).
    """
    import nibabel as nib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file not found.")
    try:
        data = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises several types
        raise ValueError(f"{path}: cannot be read as a NIfTI image ({err}).") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}.")
    return data


def _settings_key(slice_step: int, mrqy_compatible: bool, skip_first_slice: bool) -> str:
    return f"step={slice_step};mrqy={int(mrqy_compatible)};skip0={int(skip_first_slice)}"


_TABLE_FIELDS = ("image", "file_size", "mtime_ns", "settings", "status", "reason", *IQM_NAMES)


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _iqm_worker(args: tuple[str, int, bool, bool]) -> dict[str, Any]:
    path, slice_step, mrqy_compatible, skip_first_slice = args
    row: dict[str, Any] = {"image": path, "settings": _settings_key(slice_step, mrqy_compatible, skip_first_slice)}
    try:
        row["file_size"], row["mtime_ns"] = _file_id(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            vals = volume_iqms(load_volume(path), slice_step, mrqy_compatible, skip_first_slice, name=path)
        no_fg = any("no foreground" in str(w.message) for w in caught)
        row.update(vals)
        row["status"] = "no_foreground" if no_fg else "ok"
        row["reason"] = "no slice with a foreground" if no_fg else ""
    except Exception as err:  # one bad scan never stops the batch
        row.update({k: float("nan") for k in IQM_NAMES})
        row.setdefault("file_size", -1)
        row.setdefault("mtime_ns", -1)
        row["status"] = "error"
        row["reason"] = f"{type(err).__name__}: {err}".replace("\t", " ").replace("\n", " ")
    return row


def _atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (line endings as given)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, newline=""))


def _rows_to_tsv(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), delimiter="\t", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(float(r[k])) if k in IQM_NAMES else r[k]) for k in fields})
    return buf.getvalue()


def read_iqm_table(path: str) -> dict[str, dict[str, Any]]:
    """Read an IQM table TSV written by :func:`compute_iqm_table` -> {image path: row}.

    IQM columns are floats (NaN for missing), ``file_size``/``mtime_ns`` ints. A missing file gives {}.
    """
    if not os.path.isfile(path):
        return {}
    out: dict[str, dict[str, Any]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = set(_TABLE_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an IQM table, columns {sorted(missing)} are missing.")
        for r in reader:
            row: dict[str, Any] = dict(r)
            for k in IQM_NAMES:
                row[k] = float(r[k]) if r[k] not in ("", None) else float("nan")
            row["file_size"], row["mtime_ns"] = int(r["file_size"]), int(r["mtime_ns"])
            out[r["image"]] = row
    return out


def compute_iqm_table(
    images: Sequence[str],
    table_path: str | None = None,
    num_workers: int = 1,
    slice_step: int = 1,
    mrqy_compatible: bool = False,
    skip_first_slice: bool = True,
    progress: bool = True,
    save_every_s: float = 30.0,
) -> dict[str, dict[str, Any]]:
    """IQMs of many NIfTI files, cached in a TSV.

    A cached row is reused when the image path, file size, modification time (ns) and IQM settings all
    match; other images are computed (in ``num_workers`` processes) and the table is rewritten
    atomically every ``save_every_s`` seconds and at the end. Rows of images not asked for are kept.
    A file that cannot be read gets a row with ``status == "error"``, a reason and NaN IQMs (retried on
    every run); a volume without foreground gets ``status == "no_foreground"`` and NaN IQMs (cached).

    Args:
        images: paths of the volumes (used as given as the cache key; pass absolute paths).
        table_path: the TSV cache; None for no cache.
        num_workers: processes; 1 computes in this process.
        progress: show a tqdm progress bar (when tqdm is installed) or log progress.

    Returns:
        {image path: row dict with the columns of the table} for every requested image.
    """
    settings = _settings_key(slice_step, mrqy_compatible, skip_first_slice)
    table = read_iqm_table(table_path) if table_path else {}
    todo = []
    for path in dict.fromkeys(images):
        row = table.get(path)
        try:
            fid = _file_id(path)
        except OSError:
            fid = (-1, -1)
        stale = row is None or row["settings"] != settings or (row["file_size"], row["mtime_ns"]) != fid
        if stale or fid[0] < 0 or row["status"] == "error":
            todo.append(path)
    if todo:
        logger.info("IQMs: %d of %d images to compute (%d cached).", len(todo), len(images), len(images) - len(todo))
    bar = None
    if progress and todo:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="IQMs", unit="img")
        except ImportError:
            bar = None
    last_save = time.monotonic()

    def _done(row: dict[str, Any]) -> None:
        nonlocal last_save
        table[row["image"]] = row
        if row["status"] != "ok":
            warnings.warn(f"{row['image']}: IQMs are NaN ({row['status']}: {row['reason']}).", RuntimeWarning)
        if bar is not None:
            bar.update(1)
        if table_path and time.monotonic() - last_save > save_every_s:
            _atomic_write_text(table_path, _rows_to_tsv(table.values(), _TABLE_FIELDS))
            last_save = time.monotonic()

    jobs = [(p, slice_step, mrqy_compatible, skip_first_slice) for p in todo]
    try:
        if num_workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                _done(_iqm_worker(job))
                if bar is None and progress and (i + 1) % 50 == 0:
                    logger.info("IQMs: %d/%d", i + 1, len(jobs))
        else:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                futures = [pool.submit(_iqm_worker, job) for job in jobs]
                for fut in as_completed(futures):
                    _done(fut.result())
    finally:
        if bar is not None:
            bar.close()
        if table_path and todo:
            _atomic_write_text(table_path, _rows_to_tsv(table.values(), _TABLE_FIELDS))
    return {p: table[p] for p in images}


# --------------------------------------------------------------------------------------------------
# random forest
# --------------------------------------------------------------------------------------------------
def default_param_distributions() -> dict[str, Any]:
    """Search space of the random forest (METHOD.md section 7.3), for ``RandomizedSearchCV``."""
    from scipy.stats import randint

    return {
        "n_estimators": randint(100, 1001),
        "max_depth": [None, *range(5, 51, 5)],
        "min_samples_split": randint(2, 11),
        "min_samples_leaf": randint(1, 5),
        "max_features": ["sqrt", "log2", None],
        "bootstrap": [True, False],
        "class_weight": [None, "balanced"],
    }


def make_search(
    n_iter: int = 300,
    cv_folds: int = 5,
    seed: int = 0,
    n_jobs: int = 1,
    param_distributions: Mapping[str, Any] | None = None,
) -> Any:
    """``RandomizedSearchCV`` of ``Pipeline(SimpleImputer(median), RandomForestClassifier)``.

    Scoring is balanced accuracy; the folds are ``StratifiedGroupKFold(cv_folds, shuffle=True)``, so
    ``fit`` needs ``groups`` (participant ids). Keys of ``param_distributions`` are RandomForest
    parameter names (without pipeline prefix); values are lists or scipy distributions.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import RandomizedSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import Pipeline

    dists = dict(default_param_distributions() if param_distributions is None else param_distributions)
    pipe = Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("rf", RandomForestClassifier(random_state=seed)),
        ]
    )
    return RandomizedSearchCV(
        pipe,
        {f"rf__{k}": (list(v) if isinstance(v, (tuple, range)) else v) for k, v in dists.items()},
        n_iter=n_iter,
        scoring="balanced_accuracy",
        cv=StratifiedGroupKFold(n_splits=cv_folds, shuffle=True, random_state=seed),
        n_jobs=n_jobs,
        random_state=seed,
        refit=True,
        error_score="raise",
    )


def _read_datalist(dataset_dir: str, datalist: str) -> dict[str, list[dict[str, Any]]]:
    if not os.path.isfile(datalist):
        raise FileNotFoundError(f"{datalist}: datalist not found.")
    with open(datalist) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{datalist}: not valid JSON ({err}).") from err
    out: dict[str, list[dict[str, Any]]] = {}
    for split, items in data.items():
        if not isinstance(items, list):
            continue
        rows = []
        for i, item in enumerate(items):
            for key in ("image", "label"):
                if key not in item:
                    raise ValueError(f"{datalist}: item {i} of '{split}' has no '{key}'.")
            label = item["label"]
            if label not in (0, 1) or isinstance(label, bool):
                raise ValueError(f"{datalist}: item {i} of '{split}' has label {label!r}; expected 0 or 1.")
            image = item["image"]
            image = os.path.normpath(image if os.path.isabs(image) else os.path.join(dataset_dir, image))
            rows.append(
                {
                    "image": os.path.abspath(image),
                    "label": int(label),
                    "participant_id": str(item.get("participant_id", "")),
                    "session_id": str(item.get("session_id", "")),
                }
            )
        out[split] = rows
    return out


def write_predictions(
    path: str, items: Sequence[Mapping[str, Any]], prob_motion: Sequence[float], threshold: float
) -> None:
    """Write ``predictions.csv`` (image, participant_id, session_id, label, prob_motion, prediction) atomically."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_PRED_COLUMNS)
    for it, p in zip(items, prob_motion):
        w.writerow([it["image"], it["participant_id"], it["session_id"], int(it["label"]), repr(float(p)),
                    int(float(p) >= threshold)])  # fmt: skip
    _atomic_write_text(path, buf.getvalue())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


@dataclass
class IQMBaseline:
    """IQMs + random forest motion classifier, trained and evaluated on a datalist's splits.

    ``run()`` computes (or reuses) the IQMs of every image of ``train_splits`` and ``test_split``,
    tunes the forest on the training images with ``RandomizedSearchCV`` (participant-grouped,
    stratified ``cv_folds``-fold, balanced accuracy, ``n_iter`` candidates), refits it on all of them
    and writes into ``output_dir``:

    * ``predictions.csv`` -- per test image: image, participant_id, session_id, label, prob_motion,
      prediction (``int(prob_motion >= threshold)``);
    * ``metrics.json`` -- ``scripts.metrics.binary_metrics(...).as_dict()`` on the test images;
    * ``hyperparameters.json`` -- chosen hyper-parameters, CV score and the run's settings;
    * ``cv_results.tsv`` -- all candidates of the search;
    * the IQM table ``iqm_table`` (default ``output_dir/iqms.tsv``), the cache for re-runs.
    """

    dataset_dir: str
    output_dir: str
    datalist: str | None = None
    iqm_table: str | None = None
    iqm_names: Sequence[str] = DEFAULT_IQMS
    mrqy_compatible: bool = False
    slice_step: int = 1
    skip_first_slice: bool = True
    num_workers: int = 1
    train_splits: Sequence[str] = ("training", "validation")
    test_split: str = "test"
    n_iter: int = 300
    cv_folds: int = 5
    param_distributions: Mapping[str, Any] | None = None
    seed: int = 0
    n_jobs: int = 1
    threshold: float = 0.5
    progress: bool = True

    def _check(self) -> None:
        unknown = [n for n in self.iqm_names if n not in IQM_NAMES]
        if unknown or not self.iqm_names:
            raise ValueError(f"iqm_names must be a non-empty subset of {IQM_NAMES}; unknown: {unknown}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}.")

    def run(self) -> dict[str, Any]:
        """Run the whole baseline; returns the test metrics (also written to ``metrics.json``)."""
        self._check()
        datalist = self.datalist or os.path.join(self.dataset_dir, "datalist.json")
        splits = _read_datalist(self.dataset_dir, datalist)
        if self.test_split not in splits:
            raise ValueError(f"{datalist}: split '{self.test_split}' not found (have {sorted(splits)}).")
        missing = [s for s in self.train_splits if s not in splits]
        if len(missing) == len(self.train_splits):
            raise ValueError(f"{datalist}: none of the training splits {list(self.train_splits)} found.")
        if missing:
            warnings.warn(f"{datalist}: splits {missing} not found; training on the others.", RuntimeWarning)
        train = [it for s in self.train_splits if s in splits for it in splits[s]]
        test = splits[self.test_split]
        if not train or not test:
            raise ValueError(f"{datalist}: empty training ({len(train)}) or test ({len(test)}) split.")
        train_ids = {it["participant_id"] for it in train}
        leak = sorted(train_ids & {it["participant_id"] for it in test} - {""})
        if leak:
            raise ValueError(f"{datalist}: participants in both training and test splits: {leak[:5]}.")

        os.makedirs(self.output_dir, exist_ok=True)
        table_path = self.iqm_table or os.path.join(self.output_dir, "iqms.tsv")
        table = compute_iqm_table(
            [it["image"] for it in train + test], table_path, self.num_workers, self.slice_step,
            self.mrqy_compatible, self.skip_first_slice, self.progress,
        )  # fmt: skip
        names = list(self.iqm_names)
        x_train = np.array([[table[it["image"]][k] for k in names] for it in train], dtype=np.float64)
        y_train = np.array([it["label"] for it in train], dtype=np.int64)
        groups = np.array([it["participant_id"] or it["image"] for it in train])
        x_test = np.array([[table[it["image"]][k] for k in names] for it in test], dtype=np.float64)
        y_test = np.array([it["label"] for it in test], dtype=np.int64)
        if len(np.unique(y_train)) < 2:
            raise ValueError(f"{datalist}: the training images have a single class; cannot train a classifier.")

        folds = self.cv_folds
        for cls in (0, 1):
            n_groups = len(np.unique(groups[y_train == cls]))
            if n_groups < folds:
                warnings.warn(
                    f"only {n_groups} participants with label {cls} for {folds}-fold CV; using {n_groups} folds.",
                    RuntimeWarning,
                )
                folds = n_groups
        if folds < 2:
            raise ValueError(f"{datalist}: too few participants per class for cross-validation.")
        search = make_search(self.n_iter, folds, self.seed, self.n_jobs, self.param_distributions)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            search.fit(x_train, y_train, groups=groups)
        prob = search.predict_proba(x_test)[:, list(search.classes_).index(1)]

        write_predictions(os.path.join(self.output_dir, "predictions.csv"), test, prob, self.threshold)
        metrics = binary_metrics(y_test, prob, self.threshold).as_dict()
        _atomic_write_text(
            os.path.join(self.output_dir, "metrics.json"), json.dumps(_json_safe(metrics), indent=4) + "\n"
        )
        best = {k.removeprefix("rf__"): v for k, v in search.best_params_.items()}
        info = {
            "best_params": best,
            "cv_balanced_accuracy": float(search.best_score_),
            "cv_folds": folds,
            "n_iter": self.n_iter,
            "seed": self.seed,
            "iqm_names": names,
            "mrqy_compatible": self.mrqy_compatible,
            "slice_step": self.slice_step,
            "train_splits": list(self.train_splits),
            "n_train": len(train),
            "n_test": len(test),
            "imputer": "median",
            "feature_importances": dict(
                zip(names, search.best_estimator_.named_steps["rf"].feature_importances_.tolist())
            ),
        }
        _atomic_write_text(
            os.path.join(self.output_dir, "hyperparameters.json"), json.dumps(_json_safe(info), indent=4) + "\n"
        )
        cv = search.cv_results_
        cols = ["rank_test_score", "mean_test_score", "std_test_score"] + [f"param_{k}" for k in search.best_params_]
        lines = ["\t".join(c.removeprefix("param_rf__") for c in cols)]
        lines += ["\t".join(str(cv[c][i]) for c in cols) for i in np.argsort(cv["rank_test_score"], kind="stable")]
        _atomic_write_text(os.path.join(self.output_dir, "cv_results.tsv"), "\n".join(lines) + "\n")
        logger.info("IQM baseline: test balanced accuracy %.4f (%s)", metrics["balanced_accuracy"], self.output_dir)
        return metrics


# --------------------------------------------------------------------------------------------------
# predictions files and McNemar
# --------------------------------------------------------------------------------------------------
