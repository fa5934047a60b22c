"""The QC job's row statuses and its per-scan error."""

from __future__ import annotations

from scripts.common.statuses import SCORED_STATUSES, statuses

__all__ = ["QC_STATUSES", "SCORED_STATUSES", "QCError"]

#: Statuses of a row (a subset of :data:`scripts.common.statuses.STATUSES`). ``ok`` and ``warning`` rows
#: are scored; the others are not.
QC_STATUSES: dict[str, str] = statuses(
    "ok", "warning", "not_found", "not_t1w", "empty_file", "empty_folder", "unsupported_format", "unreadable", "not_3d",
    "too_small", "low_resolution", "non_finite", "empty", "not_brain", "wrong_space", "dicom_missing_slice",
    "dicom_nonuniform_spacing", "registration_failed", "registration_diverged", "out_of_memory",
    "inference_failed", "worker_crashed", "timed_out", "internal_error",
)  # fmt: skip


class QCError(Exception):
    """A scan that cannot be scored: ``code`` (a key of :data:`QC_STATUSES`) and ``reason``."""

    # B042: never pickled (the loader turns it into a status inside the worker that raised it)
    def __init__(self, code: str, reason: str) -> None:  # noqa: B042
        if code not in QC_STATUSES:
            raise ValueError(f"unknown QC status {code!r}")
        super().__init__(f"[{code}] {reason}")
        self.code, self.reason = code, reason
