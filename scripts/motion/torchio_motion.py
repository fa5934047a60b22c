"""TorchIO's image-based motion simulation (``RandomMotion``) as MONAI transforms.

This is the reference simulator of Loizillon et al. (Shaw et al.'s method): ``num_transforms`` rigid
positions are stitched as k-space segments. TorchIO draws its parameters from torch's global random
generator; these wrappers draw one seed from their own ``self.R`` and run TorchIO inside a forked
generator seeded with it, so results are reproducible with ``set_random_state`` and the global torch
state is left untouched.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torchio as tio
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["torchio_motion", "RandTorchIOMotion", "RandTorchIOMotiond"]

Range = float | tuple[float, float]


def torchio_motion(
    image: torch.Tensor,
    degrees: Range = (2.0, 8.0),
    translation: Range = (2.0, 8.0),
    num_transforms: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """Corrupt ``image`` with TorchIO's ``RandomMotion`` drawn from ``seed``.

    Args:
        image: channel-first (C, X, Y, Z) tensor; a MetaTensor's affine gives the voxel size for
            translations in mm (identity otherwise).
        degrees: rotation range in degrees; a scalar d means U(-d, d), a pair (a, b) means U(a, b).
        translation: translation range in mm, same convention.
        num_transforms: number of rigid positions (Nt).
        seed: seed of the parameter draw.

    Returns:
        the corrupted image, same type, shape, dtype and metadata as ``image``.
    """
    if image.ndim != 4:
        raise ValueError(f"expected a channel-first 3D image (C, X, Y, Z), got shape {tuple(image.shape)}.")
    affine = np.asarray(image.affine, dtype=np.float64) if isinstance(image, MetaTensor) else np.eye(4)
    data = image.as_tensor() if isinstance(image, MetaTensor) else image
    subject_image = tio.ScalarImage(tensor=data.detach().cpu().float(), affine=affine)
    motion = tio.RandomMotion(degrees=degrees, translation=translation, num_transforms=num_transforms)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        moved = motion(subject_image).data
    out = moved.to(device=image.device, dtype=image.dtype)
    if isinstance(image, MetaTensor):
        return MetaTensor(out, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    return out


class RandTorchIOMotion(RandomizableTransform):
    """With probability ``prob``, apply TorchIO's ``RandomMotion`` to a channel-first 3D image."""

    def __init__(
        self, prob: float = 0.5, degrees: Range = (2.0, 8.0), translation: Range = (2.0, 8.0), num_transforms: int = 4
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        # YAML gives lists; TorchIO wants a scalar or a (low, high) tuple
        self.degrees = tuple(degrees) if isinstance(degrees, (list, tuple)) else degrees
        self.translation = tuple(translation) if isinstance(translation, (list, tuple)) else translation
        self.num_transforms = num_transforms
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Decide whether to apply motion and draw the seed of TorchIO's parameter draw."""
        super().randomize(None)
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return torchio_motion(img, self.degrees, self.translation, self.num_transforms, self._seed)


class RandTorchIOMotiond(MapTransform, RandomizableTransform):
    """Dictionary version of :class:`RandTorchIOMotion` that also writes the motion label.

    When motion is applied, ``data[label_key]`` becomes 1; otherwise the existing label is kept
    (0 when there is none). All ``keys`` receive the same motion.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = "label",
        prob: float = 0.5,
        degrees: Range = (2.0, 8.0),
        translation: Range = (2.0, 8.0),
        num_transforms: int = 4,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.motion = RandTorchIOMotion(1.0, degrees, translation, num_transforms)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.motion.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.motion.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.motion(d[key], randomize=False)
        if self.label_key is not None:
            d[self.label_key] = 1 if self._do_transform else int(d.get(self.label_key, 0))
        return d
