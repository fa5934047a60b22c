"""Atomic file writing: a temporary file in the same folder, then a rename (nothing half-written)."""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["atomic_write", "write_json_atomic", "write_rows_atomic", "write_nifti"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp)`` to a hidden temporary file, then rename it.

    The temporary file sits in the same folder and ends like ``path`` (so writers that pick the
    format from the extension keep working); it is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=4) + "\n"))


def write_rows_atomic(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    fieldnames: Sequence[str],
    delimiter: str = ",",
    extrasaction: str = "ignore",
    errors: str = "strict",
) -> Path:
    """Write ``rows`` as a CSV/TSV table with a header (``csv.DictWriter``) atomically. ``errors`` is the
    text encoding's error handler (``"surrogateescape"`` keeps file names that are not UTF-8 as bytes)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors=errors) as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames), delimiter=delimiter, extrasaction=extrasaction)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def write_nifti(volume: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``volume`` as an int16 NIfTI (rounded, clipped to [0, 32767]) atomically; return the path."""
    data = np.clip(np.rint(volume), 0, np.iinfo(np.int16).max).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
