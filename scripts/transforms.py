"""General-purpose MONAI transforms of the bundle: input validation and per-item seeding."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

__all__ = ["image_source", "ValidateImage", "ValidateImaged", "DeterministicPerItemd"]


def image_source(img: Any) -> str:
    """Where an image came from: the file name in a MetaTensor's metadata, else ``"<in-memory image>"``."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return "<in-memory image>"


class ValidateImage(Transform):
    """Check a channel-first 3D image before it reaches a network, with an error that names the file.

    Checks: 4 dimensions (C, X, Y, Z) with ``channels`` channels; the spatial size equals
    ``spatial_size`` when given; all voxels finite; not constant.

    Args:
        spatial_size: expected (X, Y, Z), e.g. (169, 208, 179) for t1-linear images; None skips the check.
        channels: expected number of channels.
    """

    def __init__(self, spatial_size: Sequence[int] | None = (169, 208, 179), channels: int = 1) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size) if spatial_size is not None else None
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        src = image_source(img)
        shape = tuple(img.shape)
        if img.ndim != 4:
            raise ValueError(f"{src}: expected a 3D image, got an array of shape {shape[1:] if img.ndim else shape}.")
        if shape[0] != self.channels:
            raise ValueError(f"{src}: expected {self.channels} channel(s), got {shape[0]} (a 4D series?).")
        if self.spatial_size is not None and shape[1:] != self.spatial_size:
            raise ValueError(
                f"{src}: spatial size {shape[1:]} is not the expected {self.spatial_size}; "
                "is the image in t1-linear space (169x208x179 at 1 mm)? Preprocess raw scans first."
            )
        if not bool(torch.isfinite(img).all()):
            raise ValueError(f"{src}: contains NaN or infinite voxels.")
        if bool(img.max() == img.min()):
            raise ValueError(f"{src}: is constant (value {float(img.max())}); not an MR image.")
        return img


class ValidateImaged(MapTransform):
    """Dictionary version of :class:`ValidateImage`."""

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | None = (169, 208, 179),
        channels: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.validator = ValidateImage(spatial_size, channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.validator(d[key])
        return d


class DeterministicPerItemd(MapTransform):
    """Apply a random dictionary transform with a seed fixed per item, making it deterministic.

    The seed is derived from ``seed`` and the item's identity (the source file of ``id_key``, or its
    string value), so the same image always receives the same draw, whatever the order or epoch.
    Used for validation sets whose synthetic motion must not change between epochs. Because this
    wrapper is not itself random, MONAI's cache datasets cache its output. Calls are serialised by a
    lock: cache datasets fill their cache from several threads, and seeding then drawing must not
    interleave.

    Args:
        transform: a randomizable dictionary transform (it must implement ``set_random_state``).
        seed: base seed.
        id_key: key identifying the item (default ``"image"``).
    """

    def __init__(self, transform: Randomizable, seed: int = 0, id_key: str = "image") -> None:
        if not hasattr(transform, "set_random_state"):
            raise TypeError(f"{type(transform).__name__} has no set_random_state(); it cannot be seeded.")
        super().__init__(keys=[id_key], allow_missing_keys=True)
        self.transform = transform
        self.seed = int(seed)
        self.id_key = id_key
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle (DataLoader workers, deepcopy)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def item_seed(self, data: Mapping[Hashable, Any]) -> int:
        """The seed used for ``data``."""
        value = data.get(self.id_key)
        ident = image_source(value) if isinstance(value, MetaTensor) else str(value)
        return zlib.crc32(f"{self.seed}:{ident}".encode()) & 0x7FFFFFFF

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        with self._lock:
            self.transform.set_random_state(seed=self.item_seed(data))
            return self.transform(data)
