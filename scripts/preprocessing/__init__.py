"""t1-linear preprocessing with ITK: raw NIfTI/DICOM -> N4 -> affine to MNI152 2009 sym -> 169x208x179 crop.

Main entry points:

- :func:`preprocess_t1_linear` (path or image -> ``(nibabel image, PreprocessingResult)``;
  raises :class:`PreprocessingError` with a documented ``code``, see :data:`ERROR_CODES`),
- :class:`T1Linear` / :class:`T1Lineard` (MONAI transforms for inference pipelines),
- :class:`BatchPreprocessor` (folder or BIDS dataset -> CAPS-like tree + TSV; used by
  ``configs/preprocess.yaml``).

See ``docs/preprocessing.md``.
"""

from .batch import BatchPreprocessor, ScanInput, find_scans, output_paths, process_scan
from .core import PreprocessingResult, T1LinearSettings, preprocess_t1_linear
from .errors import ERROR_CODES, PreprocessingError
from .io import read_image
from .template import CROP_ORIGIN_RAS, CROP_SHAPE, SPACE_LABEL, crop_affine


def __getattr__(name: str):
    # the MONAI transforms import torch and MONAI; load them on first use only, so that batch
    # worker processes (which do not need them) start fast
    if name in ("T1Linear", "T1Lineard"):
        from . import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CROP_ORIGIN_RAS",
    "CROP_SHAPE",
    "ERROR_CODES",
    "SPACE_LABEL",
    "BatchPreprocessor",
    "PreprocessingError",
    "PreprocessingResult",
    "ScanInput",
    "T1Linear",
    "T1LinearSettings",
    "T1Lineard",
    "crop_affine",
    "find_scans",
    "output_paths",
    "preprocess_t1_linear",
    "process_scan",
    "read_image",
]
