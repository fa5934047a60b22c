"""t1-linear preprocessing of one scan with ITK: N4 -> rigid -> affine to MNI152 2009 sym -> crop.

The public entry point is :func:`preprocess_t1_linear`. It takes a NIfTI file or DICOM folder
(or an in-memory ITK/nibabel image) and returns the t1-linear image (nibabel, float32, RAS,
169x208x179, 1 mm) and a :class:`PreprocessingResult`; anything wrong with the scan raises
:class:`~scripts.preprocessing.errors.PreprocessingError`.

Steps (times are for a 1 mm head on 2 cores):

1. read + reorient (``io.read_image``).
2. N4 bias-field correction on the image shrunk to ~4 mm voxels, inside an Otsu head mask; the
   fitted log bias field is evaluated on the full grid and divided out.
3. initial pose: the template brain's centre of mass is mapped onto an estimate of the scan's
   brain centre (head-mask centre of mass in the upper head, and a fixed depth below the top of
   the head), so necks and shoulders in the field of view do not bias it.
4. rigid then affine registration (Mattes mutual information, 32 bins, random sampling,
   multi-resolution, regular-step gradient descent), template = fixed image, sampled only inside the
   (slightly dilated) template brain mask, so the skull and neck of the scan do not pull.
5. one linear resampling of the bias-corrected scan into the crop box.
6. quality: correlation of the smoothed result with the smoothed template inside the template brain mask
   (:mod:`scripts.preprocessing.quality`, shared with the QC job's ``not_brain`` gate);
   the affine's scalings are checked too. Both guard against a diverged registration.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

from .errors import PreprocessingError
from .io import LPS_TO_RAS, image_to_array, image_to_nifti, nifti_to_image, read_image
from .quality import template_similarity
from .template import crop_reference, load_template

__all__ = ["PreprocessingResult", "T1LinearSettings", "preprocess_t1_linear", "ras_matrix", "register"]

# RAS: the ICBM152 scalp top lies about this far above the template brain's centre of mass (mm);
# used to guess the brain centre of a scan from the top of its head.
_SCALP_TOP_ABOVE_BRAIN_CENTRE_MM = 88.0


@dataclass(frozen=True)
class T1LinearSettings:
    """Settings of t1-linear preprocessing (defaults are the validated ones).

    Attributes:
        n4_voxel_mm: N4 runs on the scan shrunk (integer factors per axis) to about this voxel size.
        n4_iterations: N4 iterations per fitting level (ANTs: 50x50x50x50).
        n4_convergence: N4 convergence threshold (ANTs default 0: always run all iterations).
        n4_control_points: B-spline control points per axis (4 = one span, like ANTs'
            ``bspline_fitting_distance=600`` on a head-sized field of view).
        rigid_levels: multi-resolution schedule of the rigid stage, coarse to fine, as
            (shrink factor of the 1 mm template, Gaussian sigma in mm) pairs.
        affine_levels: same for the affine stage (which starts from the rigid result).
        start_angles_deg: the coarsest rigid level also starts from the initial pose turned by
            +-each of these angles about each axis; the best fit continues (() : one start only).
        rigid_iterations, affine_iterations: maximum optimiser iterations per level.
        sampling_fraction: fraction of the template-mask voxels drawn at random per level ...
        max_samples: ... but at most this many (the full-resolution level has ~2 million).
        step_voxels: regular-step gradient descent: the first step of a level moves no point
            more than this many voxels of the level's template grid.
        min_step: the descent stops when its (relaxed) step falls below this fraction of the first.
        histogram_bins: Mattes mutual information bins.
        mask_dilation_mm: dilation of the template brain mask used as the metric's sampling mask.
        seed: seed of the random metric sampling (results are reproducible for a given seed).
        min_correlation: below this smoothed correlation with the template inside its brain mask
            (:func:`~scripts.preprocessing.quality.template_similarity`, the measure of the QC job's
            ``not_brain`` gate) the registration counts as diverged.
        doubtful_correlation: below this (and above ``min_correlation``) the result is kept with a
            note asking to check the alignment. Motion does not lower the measure (docs/gates.md).
        scale_range: allowed range of the affine's singular values (scalings); outside it, or with
            a reflection, the registration counts as diverged.
        threads: ITK threads for this process (``None``: leave ITK's default).
    """

    n4_voxel_mm: float = 4.0
    n4_iterations: tuple[int, ...] = (50, 50, 50, 50)
    n4_convergence: float = 0.005
    n4_control_points: int = 4
    rigid_levels: tuple[tuple[int, float], ...] = ((8, 4.0), (4, 2.0))
    affine_levels: tuple[tuple[int, float], ...] = ((4, 2.0), (2, 1.0), (1, 0.0))
    start_angles_deg: tuple[float, ...] = (30.0,)
    rigid_iterations: int = 200
    affine_iterations: int = 200
    sampling_fraction: float = 0.25
    max_samples: int = 30_000
    step_voxels: float = 0.5
    min_step: float = 0.001
    histogram_bins: int = 32
    mask_dilation_mm: int = 3
    seed: int = 0
    min_correlation: float = 0.4
    doubtful_correlation: float = 0.5
    scale_range: tuple[float, float] = (0.67, 1.5)
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.affine_levels:
            raise ValueError("affine_levels must not be empty")
        for shrink, sigma in (*self.rigid_levels, *self.affine_levels):
            if int(shrink) < 1 or float(sigma) < 0:
                raise ValueError(f"bad pyramid level (shrink {shrink}, sigma {sigma} mm)")
        if not 0 < self.sampling_fraction <= 1:
            raise ValueError(f"sampling_fraction must be in (0, 1], got {self.sampling_fraction}")

    @classmethod
    def coerce(cls, settings: T1LinearSettings | Mapping[str, Any] | None) -> T1LinearSettings:
        """Settings from ``None`` (defaults), an instance, or a dict of fields (lists become tuples)."""
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        return cls(**{k: _tuplify(v) for k, v in dict(settings).items()})


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class PreprocessingResult:
    """What happened to one scan.

    Attributes:
        path: the input path ("" for in-memory input).
        status: ``"ok"`` or an error code of :data:`~scripts.preprocessing.errors.ERROR_CODES`.
        reason: why it failed ("" when ok).
        notes: remarks that do not make the scan fail (e.g. which DICOM series was read).
        seconds: wall time of the whole scan (s).
        step_seconds: wall time per step (s): read, n4, register, resample, quality (+ write).
        correlation: smoothed correlation of the output with the template inside the template
            brain mask (registration quality; 0.6-0.95 when good, below ``min_correlation`` diverged).
        metric: final Mattes mutual information of the affine stage (negative; lower is better).
        scales: singular values of the affine's linear part (1 = no scaling).
        matrix: 4x4 affine mapping template RAS mm to scan RAS mm (``None`` if never computed).
        transform: the same as an ITK transform (template LPS -> scan LPS), as written to the
            ``_affine.mat`` file; not serialised into tables.
        outputs: written files (filled by the batch job).
    """

    path: str = ""
    status: str = "ok"
    reason: str = ""
    notes: str = ""
    seconds: float = float("nan")
    step_seconds: dict[str, float] = field(default_factory=dict)
    correlation: float = float("nan")
    metric: float = float("nan")
    scales: tuple[float, float, float] = (float("nan"),) * 3
    matrix: list[list[float]] | None = None
    transform: Any = field(default=None, repr=False)
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (without the ITK transform object)."""
        out = dataclasses.asdict(dataclasses.replace(self, transform=None))
        out.pop("transform")
        out["scales"] = list(self.scales)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingResult:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "scales" in kwargs:
            kwargs["scales"] = tuple(kwargs["scales"])
        return cls(**kwargs)


def ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 RAS-world matrix of an ITK affine-like transform (which works in LPS)."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(transform.GetMatrix())
    affine.SetTranslation(transform.GetTranslation())
    affine.SetCenter(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(affine.GetMatrix()).reshape(3, 3)
    # x -> A (x - c) + c + t
    center = np.asarray(affine.GetCenter())
    lps[:3, 3] = np.asarray(affine.GetTranslation()) + center - lps[:3, :3] @ center
    return LPS_TO_RAS @ lps @ LPS_TO_RAS


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def _check_intensities(image: sitk.Image, name: str) -> tuple[sitk.Image, str]:
    """Replace non-finite voxels by 0; raise ``empty`` if nothing usable is left."""
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    notes = ""
    if not finite.all():
        if not finite.any():
            raise PreprocessingError(name, "empty", "no finite voxel")
        fixed = np.where(finite, array, 0).astype(np.float32)
        notes = f"{int((~finite).sum())} non-finite voxels set to 0"
        new = sitk.GetImageFromArray(fixed)
        new.CopyInformation(image)
        image, array = new, fixed
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise PreprocessingError(name, "empty", f"constant image (all voxels = {lo:g})")
    if hi <= 0:
        raise PreprocessingError(name, "empty", f"no positive intensity (max {hi:g})")
    # more than 0.5% of voxels must stand out from the background
    strided = array[::2, ::2, ::2]
    if np.count_nonzero(strided > lo + 0.05 * (hi - lo)) < 0.005 * strided.size:
        raise PreprocessingError(name, "empty", "almost empty: under 0.5% of voxels above 5% of the range")
    return image, notes


def _shrink_factors(image: sitk.Image, target_mm: float) -> list[int]:
    return [max(1, int(round(target_mm / s))) for s in image.GetSpacing()]


def _head_mask(small: sitk.Image) -> sitk.Image:
    """Otsu foreground of a (shrunk) scan, after clipping its brightest 0.5% (fat, vessels)."""
    array = sitk.GetArrayViewFromImage(small)
    top = float(np.percentile(array, 99.5))
    clipped = sitk.Clamp(small, sitk.sitkFloat32, 0.0, top)
    return sitk.OtsuThreshold(clipped, 0, 1, 128)


def n4_correct(image: sitk.Image, settings: T1LinearSettings) -> tuple[sitk.Image, sitk.Image]:
    """N4 bias-field correction fitted on a shrunk copy, applied at full resolution.

    Returns:
        ``(corrected, head_mask_small)``: the corrected full-resolution image (float32) and the
        Otsu head mask on the shrunk grid (uint8), reused for initialisation.
    """
    small = sitk.BinShrink(image, _shrink_factors(image, settings.n4_voxel_mm))
    small = sitk.Clamp(small, sitk.sitkFloat32, 0.0)
    mask = _head_mask(small)
    mask = sitk.And(mask, sitk.Cast(small > 0, sitk.sitkUInt8))
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(settings.n4_iterations))
    n4.SetConvergenceThreshold(settings.n4_convergence)
    n4.SetNumberOfControlPoints([settings.n4_control_points] * 3)
    n4.SetSplineOrder(3)
    n4.SetBiasFieldFullWidthAtHalfMaximum(0.15)
    n4.SetWienerFilterNoise(0.01)
    n4.SetNumberOfHistogramBins(200)
    n4.Execute(small, mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    corrected = sitk.Clamp(image, sitk.sitkFloat32, 0.0) / sitk.Exp(sitk.Cast(log_bias, sitk.sitkFloat32))
    return corrected, mask


def _initial_transform(head_mask: sitk.Image, brain_centre_lps: np.ndarray) -> sitk.Euler3DTransform:
    """Rigid start: map the template brain centre onto the scan's estimated brain centre."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(head_mask) > 0)[:, ::-1].astype(float)  # (x, y, z) indices
    if len(idx) == 0:
        raise PreprocessingError("", "empty", "Otsu head mask is empty")
    direction = np.asarray(head_mask.GetDirection()).reshape(3, 3)
    points = (idx * np.asarray(head_mask.GetSpacing())) @ direction.T + np.asarray(head_mask.GetOrigin())
    z = points[:, 2]  # LPS z = superior
    top = float(np.percentile(z, 99.8))
    slab = points[(z > top - 100.0) & (z < top - 20.0)]
    if len(slab) < 10:
        slab = points
    centre = np.array([slab[:, 0].mean(), slab[:, 1].mean(), top - _SCALP_TOP_ABOVE_BRAIN_CENTRE_MM])
    # if the field of view is small (e.g. brain-only or cut), fall back to the plain centre of mass
    if top - z.min() < 110.0:
        centre = points.mean(axis=0)
    tx = sitk.Euler3DTransform()
    tx.SetCenter(brain_centre_lps.tolist())
    tx.SetTranslation((centre - brain_centre_lps).tolist())
    return tx


@dataclass
class _Fixed:
    image: sitk.Image
    mask: sitk.Image
    centre: np.ndarray


@functools.lru_cache(maxsize=2)
def _fixed_base(mask_dilation_mm: int) -> _Fixed:
    """Template cropped to its dilated brain mask (+5 mm), that mask, and the brain's centre (LPS mm)."""
    template, mask = load_template()
    dilated = mask
    if mask_dilation_mm > 0:  # a distance map is much faster than a ball dilation
        distance = sitk.SignedMaurerDistanceMap(
            mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        dilated = sitk.Cast(distance <= float(mask_dilation_mm), sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(dilated)
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    lo = [max(0, v - 5) for v in (x0, y0, z0)]
    hi = [min(n, v + s + 5) for v, s, n in zip((x0, y0, z0), (sx, sy, sz), template.GetSize(), strict=True)]
    size = [h - low for h, low in zip(hi, lo, strict=True)]
    stats.Execute(mask)
    return _Fixed(
        image=sitk.RegionOfInterest(template, size, lo),
        mask=sitk.RegionOfInterest(dilated, size, lo),
        centre=np.asarray(stats.GetCentroid(1)),
    )


@functools.lru_cache(maxsize=16)
def _fixed_level(mask_dilation_mm: int, shrink: int, sigma_mm: float) -> _Fixed:
    base = _fixed_base(mask_dilation_mm)
    image, mask = base.image, sitk.Cast(base.mask, sitk.sitkFloat32)
    if sigma_mm > 0:
        image = sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    if shrink > 1:
        image = sitk.BinShrink(image, [shrink] * 3)
        mask = sitk.BinShrink(mask, [shrink] * 3)
    return _Fixed(image=image, mask=sitk.Cast(mask > 0.5, sitk.sitkUInt8), centre=base.centre)


def _fixed(settings: T1LinearSettings, shrink: int, sigma_mm: float) -> _Fixed:
    """Template at one pyramid level (smoothed, shrunk), its sampling mask (the brain mask dilated
    by ``mask_dilation_mm``) and the template brain's centre of mass; cached per process."""
    return _fixed_level(int(settings.mask_dilation_mm), int(shrink), float(sigma_mm))


def _moving_pyramid(moving: sitk.Image, levels: set[tuple[int, float]]) -> dict[tuple[int, float], sitk.Image]:
    """The scan at each pyramid level: Gaussian-smoothed (sigma in mm) and bin-shrunk to about
    ``shrink / 2`` mm voxels. Levels are built fine to coarse, each from the previous one, so the
    full-resolution image is smoothed only once."""
    pyramid: dict[tuple[int, float], sitk.Image] = {}
    current, current_sigma = moving, 0.0
    for shrink, sigma in sorted(levels, key=lambda level: (level[1], level[0])):
        extra = float(np.sqrt(max(sigma**2 - current_sigma**2, 0.0)))
        image = sitk.SmoothingRecursiveGaussian(current, extra) if extra > 0 else current
        factors = [max(1, int(round(shrink / 2.0 / sp))) for sp in current.GetSpacing()]
        pyramid[(shrink, sigma)] = sitk.BinShrink(image, factors) if max(factors) > 1 else image
        if sigma > 0:
            current, current_sigma = pyramid[(shrink, sigma)], sigma
    return pyramid


def _run_level(
    fixed: _Fixed, moving: sitk.Image, transform: sitk.Transform, iterations: int, settings: T1LinearSettings
) -> float:
    """One single-resolution registration level; ``transform`` is optimised in place. Returns the metric."""
    n_mask = max(1, int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed.mask))))
    wanted = min(settings.max_samples, settings.sampling_fraction * n_mask)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # ITK draws this fraction of *all* fixed voxels at random and keeps those inside the mask
    reg.SetMetricSamplingPercentage(min(1.0, wanted / n_mask), settings.seed)
    reg.SetMetricFixedMask(fixed.mask)
    # with sparse samples, image gradients at the sample points (central differences) are far
    # cheaper than ITK's default of filtering the whole images
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    reg.SetInterpolator(sitk.sitkLinear)
    voxel_mm = max(fixed.image.GetSpacing())
    # regular-step gradient descent; the first step is estimated so that no point moves more than
    # step_voxels template voxels, then halves on every change of direction
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=settings.min_step,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
        estimateLearningRate=reg.Once,
        maximumStepSizeInPhysicalUnits=settings.step_voxels * voxel_mm,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed.image, moving)
    return float(reg.GetMetricValue())


def _best_start(
    start: sitk.Euler3DTransform, images: tuple[_Fixed, sitk.Image], settings: T1LinearSettings
) -> tuple[sitk.Euler3DTransform, float]:
    """Run the coarsest rigid level from ``start`` and from ``start`` turned by each of
    ``settings.start_angles_deg`` (+ and -) about each axis; return the fit with the best (lowest)
    Mattes metric. Heads scanned tilted by 30-45 degrees otherwise end in a local optimum."""
    starts = [start]
    for angle in settings.start_angles_deg:
        for axis in range(3):
            for sign in (1.0, -1.0):
                turned = sitk.Euler3DTransform(start)
                angles = [turned.GetAngleX(), turned.GetAngleY(), turned.GetAngleZ()]
                angles[axis] += sign * np.radians(float(angle))
                turned.SetRotation(*angles)
                starts.append(turned)
    best, best_metric = start, float("inf")
    for candidate in starts:
        metric = _run_level(*images, candidate, settings.rigid_iterations, settings)
        if metric < best_metric:
            best, best_metric = candidate, metric
    return best, best_metric


def register(
    moving: sitk.Image, head_mask: sitk.Image, settings: T1LinearSettings
) -> tuple[sitk.AffineTransform, float]:
    """Rigid then affine registration of a (bias-corrected) scan to the template.

    The multi-resolution pyramid is built here rather than inside ITK's registration method: ITK
    smooths the full-resolution moving image with a discrete Gaussian kernel at every level, which
    costs seconds; here the scan is smoothed recursively and shrunk to about half the template
    level's voxel size first.

    Args:
        moving: the scan (float32 ITK image).
        head_mask: its Otsu head mask (any grid), for the initial pose.
        settings: the schedule.

    Returns:
        ``(transform, metric)``: the template-to-scan affine (ITK/LPS; use it to resample the scan
        onto a template-space grid) and the final Mattes MI value.
    """
    # winsorise the scan like ANTs ([0.5, 99.5] percentiles) so a few bright voxels do not squeeze
    # the histogram
    sample = sitk.GetArrayViewFromImage(moving)[::3, ::3, ::3]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    moving = sitk.Clamp(moving, sitk.sitkFloat32, lo, hi)

    first = settings.rigid_levels[0] if settings.rigid_levels else settings.affine_levels[0]
    rigid = _initial_transform(head_mask, _fixed(settings, *first).centre)
    pyramid = _moving_pyramid(
        moving, {(int(k), float(s)) for k, s in (*settings.rigid_levels, *settings.affine_levels)}
    )

    def level_images(shrink: int, sigma: float) -> tuple[_Fixed, sitk.Image]:
        return _fixed(settings, shrink, sigma), pyramid[(int(shrink), float(sigma))]

    metric = float("nan")
    for i, (shrink, sigma) in enumerate(settings.rigid_levels):
        if i == 0 and settings.start_angles_deg:  # multi-start: the best coarse fit continues
            rigid, metric = _best_start(rigid, level_images(shrink, sigma), settings)
            continue
        metric = _run_level(*level_images(shrink, sigma), rigid, settings.rigid_iterations, settings)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    for shrink, sigma in settings.affine_levels:
        metric = _run_level(*level_images(shrink, sigma), affine, settings.affine_iterations, settings)
    return affine, metric


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def preprocess_t1_linear(
    source: str | Path | sitk.Image | nib.spatialimages.SpatialImage,
    settings: T1LinearSettings | Mapping[str, Any] | None = None,
) -> tuple[nib.Nifti1Image, PreprocessingResult]:
    """t1-linear preprocessing of one scan.

    Args:
        source: a NIfTI file, a DICOM series folder, or an in-memory 3D ITK/nibabel image (world
            geometry taken from it).
        settings: the settings (an instance, a dict of its fields, or ``None`` for the defaults).

    Returns:
        ``(image, result)``: the bias-corrected scan in template space (nibabel, float32, RAS,
        169x208x179, 1 mm, affine :func:`~scripts.preprocessing.template.crop_affine`) and the record
        (status ``"ok"``, times, registration quality, transform).

    Raises:
        PreprocessingError: on any problem with the scan; ``err.code`` is one of
            :data:`~scripts.preprocessing.errors.ERROR_CODES`. For ``registration_diverged`` the
            partial record is attached as ``err.result``.
    """
    settings = T1LinearSettings.coerce(settings)
    if settings.threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(settings.threads))
    name = str(source) if isinstance(source, (str, Path)) else ""
    result = PreprocessingResult(path=name)
    start = time.perf_counter()
    steps = result.step_seconds

    def lap(step: str, since: float) -> float:
        now = time.perf_counter()
        steps[step] = round(now - since, 3)
        return now

    t = start
    if isinstance(source, (str, Path)):
        image, result.notes = read_image(source)
    else:
        image = nifti_to_image(source) if isinstance(source, nib.spatialimages.SpatialImage) else source
        if image.GetDimension() != 3:
            raise PreprocessingError(name, "not_3d", f"{image.GetDimension()}D in-memory image")
        image = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "RAS")
    image, notes = _check_intensities(image, name)
    result.notes = "; ".join(n for n in (result.notes, notes) if n)
    t = lap("read", t)

    try:
        corrected, head_mask = n4_correct(image, settings)
        t = lap("n4", t)
        transform, result.metric = register(corrected, head_mask, settings)
        t = lap("register", t)
    except RuntimeError as err:  # ITK exceptions surface as RuntimeError
        raise PreprocessingError(name, "registration_failed", str(err).strip().splitlines()[-1][:300]) from None
    except PreprocessingError as err:
        raise PreprocessingError(name, err.code, err.reason) from None
    del image

    cropped = sitk.Resample(corrected, crop_reference(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    del corrected
    t = lap("resample", t)

    array = image_to_array(cropped)
    result.correlation = template_similarity(array)
    matrix = ras_matrix(transform)
    result.matrix = matrix.tolist()
    result.transform = transform
    result.scales = tuple(float(s) for s in np.linalg.svd(matrix[:3, :3], compute_uv=False))
    t = lap("quality", t)
    result.seconds = round(time.perf_counter() - start, 3)

    low, high = settings.scale_range
    problems = []
    if np.linalg.det(matrix[:3, :3]) <= 0:
        problems.append("the affine contains a reflection")
    if min(result.scales) < low or max(result.scales) > high:
        problems.append(f"implausible scalings {tuple(round(s, 3) for s in result.scales)} (allowed {low}..{high})")
    if not result.correlation >= settings.min_correlation:
        problems.append(
            f"smoothed correlation with the template {result.correlation:.3f} < {settings.min_correlation} "
            "inside the brain mask"
        )
    if not problems and result.correlation < settings.doubtful_correlation:
        doubt = (
            f"doubtful alignment: smoothed correlation with the template {result.correlation:.3f} "
            f"< {settings.doubtful_correlation}"
        )
        result.notes = "; ".join(n for n in (result.notes, doubt) if n)
    if problems:
        err = PreprocessingError(name, "registration_diverged", "; ".join(problems))
        result.status, result.reason = err.code, err.reason
        err.result = result  # type: ignore[attr-defined]
        raise err
    return image_to_nifti(cropped), result
