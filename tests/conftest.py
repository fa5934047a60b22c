"""Shared fixtures: a small demo dataset generated once per test session.

Unit and workflow tests run at a reduced spatial size: the demo generator samples the t1-linear box
every 4 mm (43x52x45 voxels) instead of every 1 mm (169x208x179).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

SMALL_VOXEL = 4.0
SMALL_SHAPE = (43, 52, 45)


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A research demo dataset of 8 participants at 4 mm; returns its folder (holding datalist.json)."""
    from scripts.demo import make_research_demo

    root = tmp_path_factory.mktemp("demo_small")
    make_research_demo(root, n_participants=8, seed=0, voxel_size=SMALL_VOXEL)
    return root
