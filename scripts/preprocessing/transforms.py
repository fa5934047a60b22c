"""MONAI transforms that turn a raw scan into a t1-linear image (so inference can take raw scans).

``T1Lineard(keys="image")`` placed first in a pipeline replaces ``LoadImaged``: the item holds a
path (NIfTI file or DICOM folder) and leaves as a 1x169x208x179 float32 MetaTensor in RAS with
the crop's affine. It also accepts an already loaded MetaTensor (with its RAS affine, as MONAI's
``LoadImage`` gives).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from .core import T1LinearSettings, preprocess_t1_linear
from .errors import PreprocessingError
from .io import image_from_array

__all__ = ["T1Linear", "T1Lineard"]


class T1Linear(Transform):
    """Raw T1w scan -> t1-linear image (N4, affine to MNI152 2009 sym, 169x208x179 crop at 1 mm).

    Args:
        settings: a :class:`~scripts.preprocessing.core.T1LinearSettings` or a dict of its fields.

    Input: a path (str/Path: NIfTI file or DICOM folder), a nibabel image, an ITK image, or a
    MetaTensor / tensor / array of shape (X, Y, Z) or (1, X, Y, Z) with a RAS ``affine``
    (MetaTensor's own, or ``meta_dict["affine"]`` for plain arrays).

    Output: MetaTensor of shape (1, 169, 208, 179), float32, affine = the crop's (identity
    rotation, origin (-84, -119, -78) mm); ``meta["filename_or_obj"]`` keeps the source path and
    ``meta["t1_linear_correlation"]``, ``meta["t1_linear_seconds"]`` the quality and run time.

    Raises:
        PreprocessingError: when the scan cannot be preprocessed (see ``ERROR_CODES``).
    """

    def __init__(self, settings: T1LinearSettings | Mapping[str, Any] | None = None) -> None:
        self.settings = T1LinearSettings.coerce(settings)

    def __call__(self, img: Any, meta_dict: Mapping[str, Any] | None = None) -> MetaTensor:
        source: Any
        filename = ""
        if isinstance(img, (str, Path)):
            source, filename = img, str(img)
        elif isinstance(img, (nib.spatialimages.SpatialImage, sitk.Image)):
            source = img
        else:
            source, filename = self._array_source(img, meta_dict)
        image, result = preprocess_t1_linear(source, self.settings)
        data = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None]
        meta = {
            "filename_or_obj": filename,
            "t1_linear_correlation": float(result.correlation),
            "t1_linear_seconds": float(result.seconds),
            "space": "RAS",
        }
        return MetaTensor(data, affine=torch.as_tensor(image.affine, dtype=torch.float64), meta=meta)

    @staticmethod
    def _array_source(img: Any, meta_dict: Mapping[str, Any] | None) -> tuple[sitk.Image, str]:
        affine = None
        filename = ""
        if isinstance(img, MetaTensor):
            affine = img.affine
            filename = str(img.meta.get("filename_or_obj", ""))
        elif meta_dict is not None and "affine" in meta_dict:
            affine = meta_dict["affine"]
            filename = str(meta_dict.get("filename_or_obj", ""))
        if affine is None:
            raise PreprocessingError(
                filename, "unreadable", "an array input needs a RAS affine (MetaTensor or meta_dict)"
            )
        array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3:
            raise PreprocessingError(filename, "not_3d", f"expected (X, Y, Z) or (1, X, Y, Z), got {array.shape}")
        affine_np = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
        return image_from_array(array.astype(np.float32), affine_np, filename), filename


class T1Lineard(MapTransform):
    """Dictionary wrapper of :class:`T1Linear`.

    Args:
        keys: keys of the items to preprocess (paths or images, see :class:`T1Linear`).
        settings: a :class:`~scripts.preprocessing.core.T1LinearSettings` or a dict of its fields.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        settings: T1LinearSettings | Mapping[str, Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = T1Linear(settings)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = d.get(f"{key}_meta_dict")
            d[key] = self.transform(d[key], meta)
        return d
