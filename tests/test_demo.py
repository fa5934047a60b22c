"""Tests of scripts.demo: deterministic, brain-like, participant-level splits, clinical ratings."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from scripts.demo import ensure_clinical_dataset, ensure_demo_dataset, make_clinical_demo, make_research_demo, t1_linear_grid

from conftest import SMALL_SHAPE, SMALL_VOXEL


def test_t1_linear_grid_full_and_reduced():
    shape, affine = t1_linear_grid(1.0)
    assert shape == (169, 208, 179)
    assert np.allclose(affine[:3, 3], (-84, -119, -78)) and np.allclose(np.diag(affine)[:3], 1.0)
    assert t1_linear_grid(SMALL_VOXEL)[0] == SMALL_SHAPE


def _images(root):
    return sorted(root.rglob("*_T1w.nii.gz"))


def test_research_demo_is_deterministic_and_brainlike(small_demo, tmp_path):
    again = tmp_path / "again"
    make_research_demo(again, n_participants=8, seed=0, voxel_size=SMALL_VOXEL)
    first, second = _images(small_demo), _images(again)
    assert [p.relative_to(small_demo) for p in first] == [p.relative_to(again) for p in second]
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
    assert json.loads((small_demo / "datalist.json").read_text()) == json.loads((again / "datalist.json").read_text())

    volumes = [nib.load(p) for p in first]
    arrays = [np.asarray(v.dataobj, dtype=np.float32) for v in volumes]
    for v, a in zip(volumes, arrays):
        assert a.shape == SMALL_SHAPE and np.isfinite(a).all()
        assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
        head = a > 0.1 * a.max()
        assert 0.15 < head.mean() < 0.8  # a head fills a good part of the box, not all of it
        # the brain centre is brighter than the corners (background)
        c = [s // 2 for s in a.shape]
        assert a[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2].mean() > 5 * a[:4, :4, :4].mean()
    # participants differ from one another
    assert min(np.abs(arrays[0] - x).mean() for x in arrays[1:]) > 0.01 * arrays[0].mean()


def test_different_seed_gives_different_images(small_demo, tmp_path):
    other = tmp_path / "other"
    make_research_demo(other, n_participants=3, seed=5, voxel_size=SMALL_VOXEL)
    a = np.asarray(nib.load(_images(small_demo)[0]).dataobj)
    b = np.asarray(nib.load(_images(other)[0]).dataobj)
    assert not np.array_equal(a, b)


def test_research_datalist_splits_by_participant(small_demo):
    datalist = json.loads((small_demo / "datalist.json").read_text())
    assert set(datalist) == {"training", "validation", "test"}
    owners = {}
    for split, items in datalist.items():
        assert items, f"empty split {split}"
        for item in items:
            assert item["label"] == 0 and (small_demo / item["image"]).is_file()
            owners.setdefault(item["participant_id"], set()).add(split)
    assert all(len(s) == 1 for s in owners.values())


def test_ensure_demo_dataset_uses_existing_and_refuses_foreign_folder(small_demo, tmp_path):
    assert ensure_demo_dataset(small_demo) == small_demo / "datalist.json"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my data")
    with pytest.raises(FileNotFoundError, match="no datalist.json"):
        ensure_demo_dataset(foreign)
    fresh = ensure_demo_dataset(tmp_path / "fresh", n_participants=3, voxel_size=8.0)
    assert fresh.is_file() and not (tmp_path / "fresh" / ".generating").exists()


def test_clinical_demo_ratings(tmp_path):
    tsv = make_clinical_demo(tmp_path, n_participants=14, seed=3, voxel_size=8.0, reject_fraction=0.15)
    with tsv.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0])[:5] == ["participant_id", "session_id", "image", "rater_1", "rater_2"]
    grades = {r["true_grade"] for r in rows}
    assert grades >= {"0", "1"}  # several severities
    for r in rows:
        assert (tmp_path / r["image"]).is_file()
        assert r["rater_1"] in {"0", "1", "2", "SR"} and r["rater_2"] in {"0", "1", "2", "SR", ""}
    assert any(r["rater_1"] == "SR" for r in rows)


def test_ensure_clinical_dataset_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("my data")
    with pytest.raises(FileNotFoundError, match="no ratings.tsv"):
        ensure_clinical_dataset(tmp_path)
    (tmp_path / "ratings.tsv").write_text("participant_id\timage\trater_1\n")
    assert ensure_clinical_dataset(tmp_path) == tmp_path / "ratings.tsv"
