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


def write_dicom_series(image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1.1",
                       study_uid: str = "1.2.826.0.1.3680043.2.1125.1.2", tags: dict | None = None,
                       skip: tuple[int, ...] = ()) -> list[Path]:
    """Write a SimpleITK image as a DICOM MR series, one file per slice (its geometry in the headers);
    ``tags`` are more DICOM tags (``"0008|103e"``: value) for every slice; slices in ``skip`` are left out."""
    import SimpleITK as sitk  # noqa: N813

    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    files = []
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            **(tags or {}),
        }
        for key, value in slice_tags.items():
            sl.SetMetaData(key, value)
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files
