"""Synthetic motion: transforms that corrupt motion-free T1w images with simulated patient motion.

Two simulators (pure torch, same code on CPU and GPU, see docs/motion.md):

* image-based (Shaw et al.; TorchIO ``RandomMotion``): :class:`RandImageMotion`, :class:`RandImageMotiond`,
  deterministic core :class:`ImageMotion` / :func:`apply_image_motion`;
* k-space time course (Valabregue et al.): :class:`RandKSpaceMotion`, :class:`RandKSpaceMotiond`,
  deterministic core :class:`KSpaceMotion` / :func:`apply_kspace_motion`;

plus motion metrics (:func:`motion_metrics`) and a batched on-device trainer hook
(:class:`MotionPrepareBatch`).
"""

from .batch import MotionPrepareBatch
from .image_motion import (
    IMAGE_MOTION_PRESETS,
    ImageMotion,
    RandImageMotion,
    RandImageMotiond,
    apply_image_motion,
    sample_image_motion_params,
)
from .kspace_motion import DEFAULT_N_SEGMENTS, KSpaceMotion, RandKSpaceMotion, RandKSpaceMotiond, apply_kspace_motion
from .severity import METRIC_NAMES, motion_metrics, ssim3d
from .timecourse import KSPACE_MOTION_PRESETS, random_time_course, rescale_course

__all__ = [
    "DEFAULT_N_SEGMENTS",
    "IMAGE_MOTION_PRESETS",
    "KSPACE_MOTION_PRESETS",
    "METRIC_NAMES",
    "ImageMotion",
    "KSpaceMotion",
    "MotionPrepareBatch",
    "RandImageMotion",
    "RandImageMotiond",
    "RandKSpaceMotion",
    "RandKSpaceMotiond",
    "apply_image_motion",
    "apply_kspace_motion",
    "motion_metrics",
    "random_time_course",
    "rescale_course",
    "sample_image_motion_params",
    "ssim3d",
]
