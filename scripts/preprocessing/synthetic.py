"""A synthetic head with a known pose, for testing and benchmarking t1-linear preprocessing.

The head is built in template (MNI) space from nilearn's brain-only ICBM152 2009 template: the
brain, a CSF rim, a dark skull, a bright scalp and a neck, so that a registration that ignored the
template-side brain mask would be pulled by tissue the template does not have. A random affine
(rotations, translations, anisotropic scaling) moves it into "scanner" space, where it is sampled on
an anisotropic LPS grid, multiplied by a smooth bias field and given Rician noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

from .template import load_template

__all__ = ["SyntheticScan", "affine_from_parameters", "make_head", "make_scan", "random_affine"]

#: Intensities (arbitrary units) of the synthetic tissues; the template brain is scaled by 1000.
_CSF, _SKULL, _SCALP, _MUSCLE = 150.0, 60.0, 850.0, 450.0


def make_head(neck_bottom_mm: float = -150.0, shoulders: bool = False) -> tuple[sitk.Image, sitk.Image]:
    """The synthetic head in template space (1 mm, LPS ITK image) and its brain mask.

    With ``shoulders``, the body widens below 125 mm under the brain centre into shoulders (muscle in
    a fat rim, 2 x 17 cm wide), as in a sagittal 3D T1w acquired with a large field of view; pair it
    with a ``neck_bottom_mm`` of about -200.

    Returns:
        ``(head, brain_mask)`` on a grid that extends the template grid down to
        ``neck_bottom_mm`` (world z, mm) and by 16 mm on the other sides.
    """
    template, mask = load_template()
    pad_low = [16, 16, int(round(template.GetOrigin()[2] - neck_bottom_mm))]
    pad_up = [16, 16, 16]
    brain = sitk.ConstantPad(template, pad_low, pad_up, 0.0) * 1000.0
    brain_mask = sitk.ConstantPad(mask, pad_low, pad_up, 0)
    dist = sitk.SignedMaurerDistanceMap(brain_mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    d = sitk.GetArrayFromImage(dist)
    head = sitk.GetArrayFromImage(brain)
    outside = d > 0
    head[outside & (d <= 2.5)] = _CSF
    head[outside & (d > 2.5) & (d <= 7.0)] = _SKULL
    head[outside & (d > 7.0) & (d <= 12.0)] = _SCALP
    # neck: an elliptic cylinder of muscle with a fat rim, from below the brain to the bottom
    z, y, x = np.meshgrid(*[np.arange(n) for n in head.shape], indexing="ij")
    origin = np.asarray(brain.GetOrigin())
    # LPS world coordinates of the grid (identity direction, 1 mm)
    wx, wy, wz = origin[0] + x, origin[1] + y, origin[2] + z
    ellipse = (wx / 50.0) ** 2 + ((wy - 15.0) / 55.0) ** 2  # LPS y = 15 -> RAS y = -15
    neck = (wz < -55.0) & (ellipse <= 1.0) & (head == 0)
    head[neck & (ellipse > 0.8)] = _SCALP
    head[neck & (ellipse <= 0.8)] = _MUSCLE
    if shoulders:
        # half-width grows from the neck's 50 mm at z = -125 to 170 mm at z = -165 and below
        width = 50.0 + 120.0 * np.clip((-125.0 - wz) / 40.0, 0.0, 1.0)
        torso = (wz < -125.0) & ((wx / width) ** 2 + ((wy - 15.0) / 70.0) ** 2 <= 1.0) & (head == 0)
        rim = (wx / (width - 8.0)) ** 2 + ((wy - 15.0) / 62.0) ** 2 > 1.0
        head[torso & rim] = _SCALP
        head[torso & ~rim] = _MUSCLE
    out = sitk.GetImageFromArray(head.astype(np.float32))
    out.CopyInformation(brain)
    return out, brain_mask


def affine_from_parameters(
    angles_deg: tuple[float, float, float],
    translation_mm: tuple[float, float, float],
    scales: tuple[float, float, float],
    center_ras: tuple[float, float, float] = (0.0, -18.0, 18.0),
) -> sitk.AffineTransform:
    """A template-to-scanner affine (ITK/LPS convention): ``x -> R S (x - c) + c + t``.

    Args:
        angles_deg: rotations about the x, y, z axes (degrees), composed as Rz Ry Rx.
        translation_mm: translation t (LPS mm).
        scales: per-axis scaling S, applied before the rotation.
        center_ras: the centre c (RAS mm; roughly the brain centre).
    """
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    matrix = rz @ ry @ rx @ np.diag(scales)
    center = (-center_ras[0], -center_ras[1], center_ras[2])
    return sitk.AffineTransform(matrix.ravel().tolist(), [float(t) for t in translation_mm], center)


def random_affine(
    rng: np.random.Generator, max_rotation_deg: float = 15.0, max_translation_mm: float = 20.0, max_scaling: float = 0.1
) -> sitk.AffineTransform:
    """A random :func:`affine_from_parameters`: rotations uniform in +-``max_rotation_deg`` degrees,
    translations uniform in +-``max_translation_mm`` mm, per-axis scaling uniform in 1 +- ``max_scaling``.
    """
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scales = rng.uniform(1 - max_scaling, 1 + max_scaling, 3)
    translation = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    return affine_from_parameters(tuple(angles), tuple(translation), tuple(scales))


@dataclass
class SyntheticScan:
    """A synthetic raw scan and its ground truth.

    Attributes:
        image: the scan (LPS grid, anisotropic spacing, bias field and noise).
        transform: the true template-to-scan affine (ITK/LPS convention, like the registration's).
        head: the noise- and bias-free head in template space (the truth to compare with).
        brain_mask: brain mask on the grid of ``head``.
    """

    image: sitk.Image
    transform: sitk.AffineTransform
    head: sitk.Image
    brain_mask: sitk.Image


def make_scan(
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.5),
    bias_strength: float = 0.25,
    noise_fraction: float = 0.02,
    head: tuple[sitk.Image, sitk.Image] | None = None,
    transform: sitk.AffineTransform | None = None,
    **affine_kwargs: float,
) -> SyntheticScan:
    """A synthetic raw scan: the head moved by a random affine, on an LPS grid, with bias and noise.

    Args:
        seed: seed of the random affine, bias field and noise.
        spacing: voxel size of the scan (mm), along the LPS axes.
        bias_strength: the log bias field spans about +-``bias_strength`` (0.25 -> x0.78..x1.28).
        noise_fraction: Rician noise sigma as a fraction of the scalp intensity.
        head: a precomputed ``make_head()`` result (saves a few seconds when making many scans).
        transform: the template-to-scan affine; default: :func:`random_affine` with ``affine_kwargs``.
        affine_kwargs: passed to :func:`random_affine`.
    """
    rng = np.random.default_rng(seed)
    head_img, brain_mask = head if head is not None else make_head()
    random_transform = random_affine(rng, **affine_kwargs)  # drawn anyway: same noise for a seed
    transform = transform if transform is not None else random_transform
    # bounding box of the moved head
    arr = sitk.GetArrayViewFromImage(head_img)
    nz = np.argwhere(arr > 0)
    lo, hi = nz.min(axis=0)[::-1], nz.max(axis=0)[::-1]
    corners = [
        transform.TransformPoint(head_img.TransformIndexToPhysicalPoint([int(c) for c in (ix, iy, iz)]))
        for ix in (lo[0], hi[0])
        for iy in (lo[1], hi[1])
        for iz in (lo[2], hi[2])
    ]
    corners_arr = np.asarray(corners)
    start = corners_arr.min(axis=0) - 4.0
    size = np.ceil((corners_arr.max(axis=0) + 4.0 - start) / np.asarray(spacing)).astype(int)
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin(start.tolist())
    moved = sitk.Resample(head_img, reference, transform.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    data = sitk.GetArrayFromImage(moved)  # (z, y, x)
    # smooth multiplicative bias: a random low-order polynomial in normalised coordinates
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij")
    coeffs = rng.uniform(-1, 1, 6)
    log_bias = (
        coeffs[0] * grids[0]
        + coeffs[1] * grids[1]
        + coeffs[2] * grids[2]
        + coeffs[3] * grids[0] * grids[1]
        + coeffs[4] * grids[1] ** 2
        + coeffs[5] * grids[2] ** 2
    )
    log_bias *= bias_strength / max(np.abs(log_bias).max(), 1e-6)
    data *= np.exp(log_bias)
    sigma = noise_fraction * _SCALP
    noisy = np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)
    image = sitk.GetImageFromArray(noisy.astype(np.float32))
    image.CopyInformation(reference)
    return SyntheticScan(image=image, transform=transform, head=head_img, brain_mask=brain_mask)
