"""The one vocabulary of per-scan statuses, shared by t1-linear preprocessing (its error codes) and the
QC job (the ``status`` column of ``qc.tsv``). Each job uses a subset; a code means the same everywhere.
"""

from __future__ import annotations

__all__ = ["STATUSES", "SCORED_STATUSES", "statuses"]

#: Every status a scan can get, with what it means. ``ok`` and ``warning`` rows are scored.
STATUSES: dict[str, str] = {
    "ok": "processed (scored, in the QC job)",
    "warning": "scored, but the reason names something unusual (e.g. the image looks skull-stripped)",
    "not_found": "the input path does not exist",
    "not_t1w": "a PACS series that is not a 3D T1-weighted MR image series by its DICOM attributes (not downloaded)",
    "empty_file": "the file has 0 bytes",
    "empty_folder": "the folder holds no file",
    "unsupported_format": "not a NIfTI/MetaImage/NRRD file or a DICOM series folder (by extension)",
    "unreadable": "the file or folder could not be read as an image (corrupt, truncated, not an image, a FIFO)",
    "not_3d": "not a 3D volume (2D, 4D with more than one volume, vector or complex pixels, a single slice)",
    "too_small": "fewer than 8 voxels or under 60 mm of field of view along an axis",
    "low_resolution": "voxels coarser than max_voxel_mm along an axis (thick slices)",
    "non_finite": "NaN or infinite voxels",
    "empty": "no usable intensities (all zero, constant or almost empty)",
    "not_brain": "not a T1w brain in t1-linear space (low smoothed correlation with the template, upside down, "
    "or a label map)",
    "wrong_space": "input_space is t1_linear but the image is not on the t1-linear grid",
    "dicom_missing_slice": "a DICOM series with a gap of about a slice or more",
    "dicom_nonuniform_spacing": "a DICOM series with unequal slice spacing or non-parallel slices",
    "registration_failed": "ITK failed during bias correction or registration",
    "registration_diverged": "the registration to the template is implausible (reflection, scaling, low smoothed "
    "correlation with the template)",
    "write_failed": "the outputs could not be written",
    "duplicate_id": "two inputs map to the same participant/session output name",
    "out_of_memory": "the network ran out of memory on this scan, even alone",
    "inference_failed": "the network raised an error on this scan, or its output was not finite (NaN)",
    "worker_crashed": "the process handling this scan died twice with the scan alone (out-of-memory killer?)",
    "timed_out": "loading and preprocessing this scan alone took longer than the per-scan time limit (a hung read?)",
    "internal_error": "an unexpected exception (a bug); the reason holds its type and message",
}
SCORED_STATUSES = ("ok", "warning")


def statuses(*codes: str) -> dict[str, str]:
    """The entries of :data:`STATUSES` for ``codes`` (a job's own subset), in that order."""
    unknown = [c for c in codes if c not in STATUSES]
    if unknown:
        raise KeyError(f"unknown status codes {unknown}; the vocabulary is scripts.common.statuses.STATUSES")
    return {c: STATUSES[c] for c in codes}
