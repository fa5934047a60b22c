"""The t1-linear grid: Clinica's crop of MNI152NLin2009cSym space, 169x208x179 voxels at 1 mm.

World box (RAS, mm): x -84..84, y -119..88, z -78..100. Sampled every ``voxel_size`` mm for tests.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["T1_LINEAR_ORIGIN", "T1_LINEAR_EXTENT", "t1_linear_grid", "grid_voxel"]

#: world coordinates (mm) of the first voxel of Clinica's t1-linear crop, and its extent (last - first).
T1_LINEAR_ORIGIN = (-84.0, -119.0, -78.0)
T1_LINEAR_EXTENT = (168.0, 207.0, 178.0)


def t1_linear_grid(voxel_size: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of the t1-linear box sampled every ``voxel_size`` mm (169x208x179 at 1 mm)."""
    shape = tuple(int(math.floor(e / voxel_size + 1e-6)) + 1 for e in T1_LINEAR_EXTENT)
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = T1_LINEAR_ORIGIN
    return shape, affine  # type: ignore[return-value]


def grid_voxel(shape: tuple[int, ...] | list[int]) -> float:
    """Voxel size (mm) of the grid sampling the t1-linear box with ``shape`` voxels (1 for 169x208x179)."""
    return T1_LINEAR_EXTENT[0] / (int(shape[0]) - 1)
