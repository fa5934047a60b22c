"""Batched motion on the training device: a ``prepare_batch`` for MONAI/Ignite trainers.

``MotionPrepareBatch`` moves a collated batch to the device, applies motion to a random subset of
its samples there (same simulators as the per-sample transforms) and sets their labels to 1. CPU
workers then only load data; the GPU does the simulation.

Note on order: the per-sample transforms run *before* intensity normalisation. Here the batch is
already normalised. Image-based motion with ``output="real"`` is affine in intensity (fill = image
minimum), so it commutes with min-max or z-score normalisation; magnitude output and the
percentile clip do not commute exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from monai.engines.utils import PrepareBatch
from monai.transforms import Randomizable

from .image_motion import RandImageMotion
from .kspace_motion import RandKSpaceMotion

__all__ = ["MotionPrepareBatch"]


class MotionPrepareBatch(PrepareBatch, Randomizable):
    """Trainer ``prepare_batch`` that simulates motion on the device for a random subset.

    Args:
        method: ``"image"`` (:class:`~scripts.motion.image_motion.RandImageMotion`) or ``"kspace"``
            (:class:`~scripts.motion.kspace_motion.RandKSpaceMotion`).
        prob: probability that each sample of the batch is corrupted (independently).
        seed: seed of the random state (``None``: numpy's global state draws one).
        image_key, label_key: batch keys.
        **kwargs: arguments of the random transform (``prob`` excluded).

    Call signature (``monai.engines.utils.PrepareBatch``): ``(batchdata, device, non_blocking, **kwargs)``
    returning ``(image, label)``; ``last_selected`` holds the corrupted indices of the last batch and
    ``last_params`` their drawn parameters.
    """

    def __init__(
        self,
        method: Literal["image", "kspace"] = "image",
        prob: float = 0.5,
        seed: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        **kwargs: Any,
    ) -> None:
        if method == "image":
            self.transform = RandImageMotion(prob=1.0, **kwargs)
        elif method == "kspace":
            self.transform = RandKSpaceMotion(prob=1.0, **kwargs)
        else:
            raise ValueError(f"MotionPrepareBatch: method must be 'image' or 'kspace', got {method!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"MotionPrepareBatch: prob must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self.image_key, self.label_key = image_key, label_key
        self.last_selected: list[int] = []
        self.last_params: list[dict[str, torch.Tensor]] = []
        self.set_random_state(seed)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw which of ``data`` (the batch size) samples are corrupted."""
        self.last_selected = [i for i in range(int(data)) if self.R.rand() < self.prob]

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = batchdata[self.image_key]
        images = images.to(device=device, non_blocking=non_blocking, **kwargs) if device is not None else images
        labels = batchdata.get(self.label_key)
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.long)
        labels = torch.as_tensor(labels)
        labels = labels.to(device=device, non_blocking=non_blocking, **kwargs) if device is not None else labels
        affines = getattr(images, "affine", None)
        self.randomize(images.shape[0])
        self.last_params = []
        if self.last_selected:
            images = images.clone()
            labels = labels.clone()
        for i in self.last_selected:
            aff = None
            if affines is not None:
                aff = affines[i] if affines.ndim == 3 else affines
            self.transform.randomize()
            sample = images[i].as_tensor() if hasattr(images, "as_tensor") else images[i]
            moved = self.transform(_with_affine(sample, aff), randomize=False)
            images[i] = torch.as_tensor(moved).to(images.dtype)
            labels[i] = 1
            self.last_params.append(self.transform.last_params())
        return images, labels


def _with_affine(sample: torch.Tensor, affine: torch.Tensor | None) -> Any:
    """Attach an affine to a plain tensor sample so the transforms see the right geometry."""
    if affine is None:
        return sample
    from monai.data import MetaTensor

    return MetaTensor(sample, affine=torch.as_tensor(affine).cpu())
