"""The one exception raised by t1-linear preprocessing, and its documented codes.

A batch job over thousands of scans catches :class:`PreprocessingError` per scan, writes
``status = error.code`` and ``reason = error.reason`` into its table, and carries on.
"""

from __future__ import annotations

from pathlib import Path

from scripts.common.statuses import statuses

__all__ = ["ERROR_CODES", "PreprocessingError"]

#: Every code a :class:`PreprocessingError` may carry (a subset of the shared vocabulary,
#: :data:`scripts.common.statuses.STATUSES`). A scan that went through has the status ``"ok"``.
ERROR_CODES: dict[str, str] = statuses(
    "not_found", "unreadable", "not_3d", "too_small", "empty", "dicom_missing_slice", "dicom_nonuniform_spacing",
    "registration_failed", "registration_diverged", "write_failed", "duplicate_id", "internal_error",
)  # fmt: skip


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
