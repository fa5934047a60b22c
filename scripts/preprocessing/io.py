"""Reading raw T1w scans (NIfTI files, DICOM series folders), geometry conversions, atomic writes.

ITK (through SimpleITK) keeps geometry in LPS physical coordinates; nibabel and MONAI use RAS.
The helpers here convert between the two so that every array leaving this package is indexed
(x, y, z) with a RAS affine, like ``nibabel.load(...).get_fdata()``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

from scripts.common.files import atomic_write  # noqa: F401 - re-exported for the batch job

from .errors import PreprocessingError

__all__ = [
    "LPS_TO_RAS",
    "atomic_write",
    "check_dicom_slices",
    "image_from_array",
    "image_to_array",
    "image_to_nifti",
    "nifti_to_image",
    "ras_affine",
    "read_image",
]

#: Flips the first two world axes: LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_MIN_VOXELS = 8  # along each axis
_MIN_FOV_MM = 60.0  # along each axis


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def ras_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-to-RAS-world affine (mm) of a 3D ITK image, for arrays indexed (x, y, z)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def image_to_array(image: sitk.Image) -> np.ndarray:
    """Voxel array of a 3D ITK image indexed (x, y, z) (ITK's numpy view is (z, y, x))."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def image_from_array(array: np.ndarray, affine: np.ndarray, name: str = "") -> sitk.Image:
    """A 3D float32 ITK image from an (x, y, z) array and its voxel-to-RAS affine (mm).

    Raises:
        PreprocessingError: ``not_3d`` if the array is not 3D, ``unreadable`` if the affine has
            shear or a zero column (ITK images only hold rotation x spacing).
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise PreprocessingError(name, "not_3d", f"expected a 3D array, got shape {array.shape}")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
    linear = lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise PreprocessingError(name, "unreadable", f"degenerate affine:\n{np.asarray(affine)}")
    direction = linear / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise PreprocessingError(name, "unreadable", "the affine has shear; ITK images cannot hold it")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    return image


def image_to_nifti(image: sitk.Image) -> nib.Nifti1Image:
    """A float32 RAS NIfTI (nibabel, in memory) holding a 3D ITK image; qform and sform set."""
    img = nib.Nifti1Image(image_to_array(image).astype(np.float32, copy=False), ras_affine(image))
    img.set_qform(img.affine, code=1)  # scanner-anat; MNI space is declared by the file name
    img.set_sform(img.affine, code=4)  # 4 = MNI152
    img.header.set_xyzt_units("mm", "sec")
    return img


def nifti_to_image(img: nib.spatialimages.SpatialImage) -> sitk.Image:
    """A 3D float32 ITK image from an in-memory nibabel image (uses ``img.affine``)."""
    return image_from_array(np.asarray(img.dataobj, dtype=np.float32), img.affine)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def read_image(path: str | Path) -> tuple[sitk.Image, str]:
    """Read one raw scan as a float32, RAS-reoriented 3D ITK image.

    Args:
        path: a NIfTI file (``.nii``, ``.nii.gz``; other ITK formats such as ``.mha`` and ``.nrrd``
            also work) or a folder holding a DICOM series.

    Returns:
        ``(image, notes)``: the image with its voxel axes permuted/flipped to the closest RAS
        orientation (``DICOMOrient``; an oblique direction is kept, no resampling), and a note
        for the result record (empty unless something was worth telling, e.g. which of several
        DICOM series was read).

    Raises:
        PreprocessingError: ``not_found``, ``unreadable``, ``not_3d``, ``too_small``,
            ``dicom_missing_slice``, ``dicom_nonuniform_spacing``.
    """
    path = Path(path)
    if not path.exists():
        raise PreprocessingError(path, "not_found", "no such file or folder")
    notes = ""
    if path.is_dir():
        image, notes = _read_dicom_folder(path)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise PreprocessingError(path, "unreadable", _first_line(err)) from None
    image = _squeeze_to_3d(image, path)
    _check_geometry(image, path)
    image = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "RAS")
    return image, notes


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    interesting = [line for line in lines if "exception" not in line.lower()] or lines or ["unknown error"]
    return interesting[-1][:300]


def _squeeze_to_3d(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PreprocessingError(
            path, "not_3d", f"pixels have {image.GetNumberOfComponentsPerPixel()} components (RGB/vector)"
        )
    size = list(image.GetSize())
    if image.GetDimension() == 4:
        if size[3] != 1:
            raise PreprocessingError(path, "not_3d", f"4D image with {size[3]} volumes (size {size})")
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise PreprocessingError(path, "not_3d", f"{image.GetDimension()}D image (size {size})")
    return image


def _check_geometry(image: sitk.Image, path: Path) -> None:
    size = np.asarray(image.GetSize())
    if np.any(size == 1):
        raise PreprocessingError(path, "not_3d", f"a single slice along an axis (size {tuple(int(s) for s in size)})")
    fov = size * np.asarray(image.GetSpacing())
    if np.any(size < _MIN_VOXELS) or np.any(fov < _MIN_FOV_MM):
        raise PreprocessingError(
            path,
            "too_small",
            f"size {tuple(int(s) for s in size)} voxels, field of view {tuple(round(float(f), 1) for f in fov)} mm; "
            f"need >= {_MIN_VOXELS} voxels and >= {_MIN_FOV_MM:g} mm along every axis",
        )


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, str]:
    """Read the DICOM series of a folder (the one with most files if there are several)."""
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as err:
        raise PreprocessingError(folder, "unreadable", _first_line(err)) from None
    if not series_ids:
        raise PreprocessingError(folder, "unreadable", "folder holds no DICOM series (and is not a file)")
    by_size = sorted(
        ((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid), sid) for sid in series_ids),
        key=lambda item: -len(item[0]),
    )
    files, series_id = by_size[0]
    notes = ""
    if len(by_size) > 1:
        notes = f"{len(by_size)} DICOM series in the folder; read {series_id} ({len(files)} files)"
    if len(files) > 1:
        check_dicom_slices(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise PreprocessingError(folder, "unreadable", _first_line(err)) from None
    return image, notes


def _dicom_vector(reader: sitk.ImageFileReader, tag: str, n: int, name: str, folder: Path) -> np.ndarray:
    if not reader.HasMetaDataKey(tag):
        raise PreprocessingError(folder, "unreadable", f"{Path(name).name} lacks DICOM tag {tag}")
    try:
        values = np.asarray([float(v) for v in reader.GetMetaData(tag).strip().split("\\")])
    except ValueError:
        raise PreprocessingError(folder, "unreadable", f"{Path(name).name}: bad DICOM tag {tag}") from None
    if values.size != n:
        raise PreprocessingError(folder, "unreadable", f"{Path(name).name}: DICOM tag {tag} has {values.size} values")
    return values


def check_dicom_slices(files: list[str] | tuple[str, ...], folder: str | Path, tolerance: float = 0.05) -> float:
    """Check that single-frame DICOM slices form a regular stack.

    Reads Image Position/Orientation (Patient) of every file (headers only) and checks that the
    slices are parallel, stacked along their normal, and equally spaced.

    Args:
        files: the series' files.
        folder: the series folder, for error messages.
        tolerance: allowed relative deviation of a slice step from the median step.

    Returns:
        The median slice step (mm).

    Raises:
        PreprocessingError: ``dicom_missing_slice`` if a step is >= 1.5 median steps (a gap),
            ``dicom_nonuniform_spacing`` for unequal steps, duplicates, tilt or non-parallel slices.
    """
    folder = Path(folder)
    reader = sitk.ImageFileReader()
    positions, orientations = [], []
    for name in files:
        reader.SetFileName(str(name))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise PreprocessingError(folder, "unreadable", f"{Path(name).name}: {_first_line(err)}") from None
        positions.append(_dicom_vector(reader, "0020|0032", 3, name, folder))
        orientations.append(_dicom_vector(reader, "0020|0037", 6, name, folder))
    orientations_arr = np.asarray(orientations)
    if np.abs(orientations_arr - orientations_arr[0]).max() > 1e-3:
        raise PreprocessingError(folder, "dicom_nonuniform_spacing", "slices are not parallel (orientation differs)")
    row, col = orientations_arr[0, :3], orientations_arr[0, 3:]
    normal = np.cross(row, col)
    pos = np.asarray(positions)
    along = pos @ normal
    order = np.argsort(along)
    along, pos = along[order], pos[order]
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= 1e-3 or np.any(steps <= 1e-3):
        raise PreprocessingError(folder, "dicom_nonuniform_spacing", "several slices share one position")
    lateral = (pos - pos[0]) - np.outer(along - along[0], normal)
    if np.abs(lateral).max() > tolerance * median + 0.01:
        raise PreprocessingError(
            folder, "dicom_nonuniform_spacing", "slices are not stacked along their normal (gantry tilt?)"
        )
    worst = int(np.argmax(np.abs(steps - median)))
    if steps.max() >= 1.5 * median:
        gap = int(np.argmax(steps))
        raise PreprocessingError(
            folder,
            "dicom_missing_slice",
            f"gap of {steps[gap]:.2f} mm between slices {gap} and {gap + 1} of {len(files)} "
            f"(median step {median:.2f} mm): about {round(steps[gap] / median) - 1} slice(s) missing",
        )
    if abs(steps[worst] - median) > tolerance * median + 0.01:
        raise PreprocessingError(
            folder,
            "dicom_nonuniform_spacing",
            f"slice step {steps[worst]:.3f} mm between slices {worst} and {worst + 1} differs from "
            f"the median {median:.3f} mm",
        )
    return median
