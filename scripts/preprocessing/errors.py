"""The one exception raised by t1-linear preprocessing, and its documented codes.

A batch job over thousands of scans catches :class:`PreprocessingError` per scan, writes
``status = error.code`` and ``reason = error.reason`` into its table, and carries on.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ERROR_CODES", "PreprocessingError"]

#: Every code a :class:`PreprocessingError` may carry, with what it means. A scan that went
#: through has the status ``"ok"``.
ERROR_CODES: dict[str, str] = {
    "not_found": "the input path does not exist",
    "unreadable": "the file or folder could not be read as NIfTI or as a DICOM series",
    "not_3d": "the image is not a 3D volume (2D, or 4D with more than one volume, or vector pixels)",
    "too_small": "fewer than 8 voxels along an axis, or a field of view under 60 mm along an axis",
    "empty": "no usable intensities (all zero, constant, or not finite)",
    "dicom_missing_slice": "a DICOM series has a gap of about a whole slice (or more) between positions",
    "dicom_nonuniform_spacing": "a DICOM series has unequal slice spacing or slices that are not parallel",
    "registration_failed": "ITK raised an error during bias correction or registration",
    "registration_diverged": (
        "the affine is implausible (scaling outside the allowed range, or a reflection) or the "
        "registered image correlates too weakly with the template inside the brain mask"
    ),
    "write_failed": "the outputs could not be written",
    "duplicate_id": "two inputs map to the same participant/session output name",
    "internal_error": "an unexpected exception (a bug); the reason holds its type and message",
}


class PreprocessingError(Exception):
    """A scan that cannot be preprocessed.

    Attributes:
        path: the input (NIfTI file or DICOM folder) the error is about; may be empty for
            in-memory inputs.
        code: one of the keys of :data:`ERROR_CODES`.
        reason: a sentence for a person, naming what is wrong.
    """

    # B042: the message is built from the fields; __reduce__ below keeps pickle and copy working
    def __init__(self, path: str | Path | None, code: str, reason: str) -> None:  # noqa: B042
        if code not in ERROR_CODES:
            raise ValueError(f"unknown preprocessing error code {code!r}; known: {sorted(ERROR_CODES)}")
        self.path = str(path) if path is not None else ""
        self.code = code
        self.reason = reason
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}[{code}] {reason}")

    def __reduce__(self):  # keep the three fields when the error crosses a process boundary
        return (type(self), (self.path, self.code, self.reason))
