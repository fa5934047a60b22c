"""Process-level settings that make CPU training and inference of 3D CNNs faster.

Measured on 2 cores (docs/performance.md, ``tests/benchmarks/bench_training.py``): a full-size
Conv5FC3 step spends a third of its time in page faults, because glibc gives every large tensor
fresh pages from ``mmap`` and returns them at ``free``. :func:`tune_allocator` keeps freed memory
in the heap instead, so each step reuses pages that are already mapped; channels-last 3D memory
lets oneDNN use its blocked convolution kernels.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

import torch

__all__ = [
    "tune_allocator",
    "restore_allocator",
    "worker_init",
    "channels_last",
    "CHANNELS_LAST",
    "ChannelsLastPrepareBatch",
]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
CHANNELS_LAST = torch.channels_last_3d
_tuned = False


def tune_allocator(enable: bool = True) -> bool:
    """Stop glibc from unmapping large freed blocks (no ``mmap`` for big allocations, no trimming).

    Returns True when the setting is in force (Linux with glibc), False elsewhere or when disabled;
    it never raises. Peak memory is unchanged; memory freed by the process is kept for reuse instead
    of being returned to the system.
    """
    global _tuned
    if not enable or not sys.platform.startswith("linux"):
        return False
    if _tuned:
        return True
    try:
        # the running process's own symbols: no library search (find_library forks a process to run ldconfig)
        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        ok = False
    _tuned = ok
    logger.info("allocator tuning %s", "on" if ok else "unavailable")
    return ok


def restore_allocator() -> bool:
    """Undo :func:`tune_allocator` in this process (glibc's defaults: large blocks from ``mmap``, trimming).

    For DataLoader workers forked from a tuned process: they inherit the setting, and a worker that
    renders large temporaries would otherwise keep its peak memory for good. Returns True when done.
    """
    global _tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(_M_MMAP_MAX, 65536)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False
    _tuned = False
    return ok


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: MONAI's per-worker seeding, then glibc's default allocator."""
    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)
    restore_allocator()


def channels_last(module: torch.nn.Module, enable: bool = True) -> Any:
    """``module`` with its 5-D parameters in channels-last 3D memory (in place); unchanged when disabled."""
    return module.to(memory_format=CHANNELS_LAST) if enable else module


class ChannelsLastPrepareBatch:
    """``prepare_batch`` for MONAI engines: MONAI's default, with the image in channels-last 3D memory.

    Args:
        enable: False gives MONAI's default unchanged.
        as_tensor: return plain tensors instead of MONAI ``MetaTensor`` (the metadata is dropped). Needed
            with ``SupervisedTrainer(compile=True)``: MONAI 1.6 fails copying a collated batch's metadata
            back onto the logits ("Boolean value of Tensor with more than one value is ambiguous").
    """

    def __init__(self, enable: bool = True, as_tensor: bool = False) -> None:
        self.enable = enable
        self.as_tensor = as_tensor

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        from monai.data import MetaTensor
        from monai.engines.utils import default_prepare_batch

        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.as_tensor:
            image, label = (t.as_tensor() if isinstance(t, MetaTensor) else t for t in (image, label))
        if self.enable and torch.as_tensor(image).ndim == 5:
            image = image.contiguous(memory_format=CHANNELS_LAST)
        return image, label
