"""The MNI ICBM152 2009 symmetric template (nilearn's packaged copy) and the t1-linear crop grid.

nilearn ships the template inside its wheel (no download): 197x233x189 voxels at 1 mm, world box
x -98..98, y -134..98, z -72..116 mm (RAS), brain only, intensities 0..1. Clinica's t1-linear crop
box is x -84..84, y -119..88, z -78..100 mm (169x208x179 at 1 mm); its lowest 6 slices
(z -78..-73) lie below nilearn's template, which only matters on the template side (no template
intensities or mask there); the registered scan is still resampled into them.
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

from .io import image_from_array

__all__ = [
    "CROP_ORIGIN_RAS",
    "CROP_SHAPE",
    "SPACE_LABEL",
    "crop_affine",
    "crop_reference",
    "load_template",
    "template_on_crop_grid",
]

#: Shape (x, y, z) of the t1-linear crop at 1 mm.
CROP_SHAPE: tuple[int, int, int] = (169, 208, 179)
#: RAS world coordinates (mm) of voxel (0, 0, 0) of the crop; the direction is the identity.
CROP_ORIGIN_RAS: tuple[float, float, float] = (-84.0, -119.0, -78.0)
#: BIDS/CAPS label of the template space.
SPACE_LABEL = "MNI152NLin2009cSym"


def crop_affine() -> np.ndarray:
    """The voxel-to-RAS affine of the t1-linear crop: identity rotation, 1 mm, origin (-84, -119, -78)."""
    affine = np.eye(4)
    affine[:3, 3] = CROP_ORIGIN_RAS
    return affine


def crop_reference() -> sitk.Image:
    """An empty ITK image with the crop grid's geometry (LPS: direction diag(-1, -1, 1))."""
    ref = sitk.Image(list(CROP_SHAPE), sitk.sitkFloat32)
    ref.SetSpacing((1.0, 1.0, 1.0))
    ref.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    ref.SetOrigin((-CROP_ORIGIN_RAS[0], -CROP_ORIGIN_RAS[1], CROP_ORIGIN_RAS[2]))
    return ref


@functools.lru_cache(maxsize=1)
def load_template() -> tuple[sitk.Image, sitk.Image]:
    """nilearn's 1 mm MNI ICBM152 2009 template (float32, 0..1) and its brain mask (uint8), as ITK images.

    Cached per process. Nothing is downloaded: both files are inside the nilearn package.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    t_img = image_from_array(np.asarray(template.get_fdata(), dtype=np.float32), template.affine, "MNI152 template")
    m_img = image_from_array(np.asarray(mask.get_fdata() > 0.5, dtype=np.float32), mask.affine, "MNI152 mask")
    return t_img, sitk.Cast(m_img, sitk.sitkUInt8)


@functools.lru_cache(maxsize=1)
def template_on_crop_grid() -> tuple[np.ndarray, np.ndarray]:
    """Template intensities and brain mask sampled on the crop grid, as (x, y, z) arrays.

    The crop grid is an integer sub-grid of the template grid, so this is an exact copy; the
    6 slices below the template (z < -72 mm) are 0.
    """
    template, mask = load_template()
    ref = crop_reference()
    identity = sitk.Transform(3, sitk.sitkIdentity)
    t = sitk.Resample(template, ref, identity, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    m = sitk.Resample(mask, ref, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    to_xyz = (2, 1, 0)
    return (
        sitk.GetArrayFromImage(t).transpose(to_xyz).copy(),
        sitk.GetArrayFromImage(m).transpose(to_xyz).astype(bool),
    )
