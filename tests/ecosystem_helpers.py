"""Helpers shared by the ecosystem tests (packaging, exports, MONAI Label app, integrity); not collected."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import SMALL_SHAPE
from scripts.networks import Conv5FC3


def save_small_model(path: Path, seed: int) -> Conv5FC3:
    """Save a freshly initialised Conv5FC3 for 43x52x45 inputs as a plain state dict at ``path``.

    BatchNorm running statistics are randomised so that eval mode is not an identity and an export
    that dropped or mixed them up would be caught.
    """
    torch.manual_seed(seed)
    net = Conv5FC3(input_size=SMALL_SHAPE)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


def unpublished_bundle(dest: Path) -> Path:
    """A copy of the bundle's released sources (LICENSE, configs, docs, scripts) at ``dest`` without the
    shipped weights and their ``large_files.yml``: a checkout whose own weights have no published hash."""
    import shutil

    from conftest import BUNDLE_ROOT

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLE_ROOT / "LICENSE", dest / "LICENSE")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("configs", "docs", "scripts"):
        shutil.copytree(BUNDLE_ROOT / folder, dest / folder, ignore=ignore)
    return dest
