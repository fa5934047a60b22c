"""Atomic file writing: a temporary file in the same folder, then a rename (nothing half-written)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["write_nifti"]


def write_nifti(volume: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``volume`` as an int16 NIfTI (rounded, clipped to [0, 32767]) atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.rint(volume), 0, np.iinfo(np.int16).max).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path
