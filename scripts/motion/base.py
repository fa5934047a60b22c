"""Shared plumbing of the motion transforms: input checks, range parsing and the dictionary wrapper.

Every random array transform of this package (``RandImageMotion``, ``RandKSpaceMotion``) implements
the small protocol used here:

* ``randomize(img)`` draws all parameters for one call (``_do_transform`` and the motion itself);
* ``__call__(img, randomize=True)`` applies them;
* ``last_params()`` returns the drawn parameters as fixed-size float32 tensors (zeros when motion
  was not applied) so that they collate in a ``DataLoader``;
* ``last_course()`` returns the per-phase-plane pose course ``(6, n)`` used by the metrics.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

from .severity import METRIC_NAMES, motion_metrics

__all__ = ["parse_range", "parse_phase_axes", "draw_phase_axis", "as_volume", "set_motion_label", "RandMotionDictBase"]


def parse_range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """TorchIO-style range: a scalar ``d`` means ``U(-d, d)``, a pair ``(a, b)`` means ``U(a, b)``."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name}: a scalar range must be >= 0, got {value}")
        return (-float(value), float(value))
    vals = [float(v) for v in value]
    if len(vals) != 2 or vals[0] > vals[1]:
        raise ValueError(f"{name}: expected a scalar or a pair (low, high) with low <= high, got {value!r}")
    return (vals[0], vals[1])


def parse_phase_axes(phase_axis: int | Sequence[int], where: str) -> list[int]:
    """Phase-encoding axes to draw from: one spatial axis (0, 1, 2) or a non-empty list of them."""
    axes = [phase_axis] if isinstance(phase_axis, (int, np.integer)) else list(phase_axis)
    if not axes or any(ax not in (0, 1, 2) for ax in axes):
        raise ValueError(f"{where}: phase_axis must be in (0, 1, 2) or a list of them, got {phase_axis!r}")
    return [int(ax) for ax in axes]


def draw_phase_axis(rng: np.random.RandomState, axes: list[int]) -> int:
    """One of ``axes``; no random number is consumed when there is only one."""
    return int(rng.choice(axes)) if len(axes) > 1 else axes[0]


def as_volume(img: Any, affine: Any = None, where: str = "motion") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a channel-first 3D image and return ``(data (C, X, Y, Z) tensor, affine (4, 4) float64)``.

    The affine is taken from a MetaTensor, else from ``affine``, else the identity (1 mm voxels).
    """
    data = torch.as_tensor(img)
    if data.ndim != 4:
        raise ValueError(f"{where}: expected a channel-first 3D image (C, X, Y, Z), got shape {tuple(data.shape)}")
    if min(data.shape[1:]) < 2:
        raise ValueError(f"{where}: every spatial axis needs at least 2 voxels, got shape {tuple(data.shape)}")
    if not data.is_floating_point():
        data = data.float()
    if affine is None:
        affine = getattr(img, "affine", None)
    aff = torch.eye(4, dtype=torch.float64) if affine is None else torch.as_tensor(affine, dtype=torch.float64).cpu()
    if aff.ndim == 3:  # a batch of one
        aff = aff[0]
    if aff.shape != (4, 4):
        raise ValueError(f"{where}: affine must be 4x4, got {tuple(aff.shape)}")
    return (data.as_tensor() if hasattr(data, "as_tensor") else data), aff


def set_motion_label(d: dict, label_key: str | None, applied: bool) -> None:
    """Label 1 when motion was applied; otherwise keep the existing label (0 when absent).

    The new label keeps the type of an existing one (tensor dtype and shape, or Python number).
    """
    if label_key is None:
        return
    old = d.get(label_key)
    if not applied:
        if old is None:
            d[label_key] = 0
        return
    if old is None:
        d[label_key] = 1
    elif isinstance(old, torch.Tensor):
        d[label_key] = torch.ones_like(old)
    elif isinstance(old, np.ndarray):
        d[label_key] = np.ones_like(old)
    else:
        d[label_key] = type(old)(1)


class RandMotionDictBase(RandomizableTransform, MapTransform):
    """Dictionary wrapper around a random motion array transform (see module docstring).

    Subclasses set ``array_class``, the random array transform they wrap; it is built from the
    extra keyword arguments (its own ``prob`` is forced to 1: ``prob`` here decides).

    Args:
        keys: image keys; all get the same drawn motion (shapes must agree).
        label_key: key set to 1 when motion is applied (``None``: do not touch labels).
        prob: probability of applying motion to a sample.
        params_key: if set, write ``d[params_key]`` = dict of fixed-size float32 tensors of the drawn
            parameters (zeros when not applied) plus ``"applied"`` (0./1.).
        metrics_key: if set, write ``d[metrics_key]`` = dict of float metrics (see
            :mod:`scripts.motion.severity`; all zeros and ``ssim = 1`` when not applied). Costs one
            SSIM evaluation per sample.
        allow_missing_keys: as in MONAI.
        **kwargs: arguments of ``array_class`` (except ``prob``).
    """

    array_class: type

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str | None = "label",
        prob: float = 0.5,
        params_key: str | None = None,
        metrics_key: str | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.array = self.array_class(prob=1.0, **kwargs)
        self.label_key = label_key
        self.params_key = params_key
        self.metrics_key = metrics_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.array.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(None)
        applied = bool(self._do_transform)
        clean = d[first]
        if applied:
            self.array.randomize(clean)
            for key in self.key_iterator(d):
                d[key] = self.array(d[key], randomize=False)
        set_motion_label(d, self.label_key, applied)
        if self.params_key is not None:
            params = self.array.last_params(clean) if applied else self.array.zero_params(clean)
            params["applied"] = torch.tensor(float(applied))
            d[self.params_key] = params
        if self.metrics_key is not None:
            if applied:
                d[self.metrics_key] = motion_metrics(
                    self.array.last_course(clean), torch.as_tensor(clean), torch.as_tensor(d[first])
                )
            else:
                d[self.metrics_key] = dict.fromkeys(METRIC_NAMES, 0.0) | {"ssim": 1.0}
        return d


def wrap_like(result: torch.Tensor, img: Any) -> Any:
    """Return ``result`` with the type, metadata and device of ``img`` (MetaTensor stays MetaTensor)."""
    out, *_ = convert_to_dst_type(result, img, dtype=result.dtype)
    return out
