"""Tests of scripts.common.inputs, the one input resolver of the QC job, inference datalists and batch
preprocessing: layouts (BIDS, CAPS, plain folders, DICOM series), lists, datalists, symlinks, strictness."""

import json
import os

import pytest

from scripts.common.files import write_json_atomic
from scripts.common.inputs import bids_entities, find_scan_paths, is_dicom_series_folder, load_datalist, resolve_inputs


def _touch(root, *names, data=b"x"):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _dicom_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)


def test_load_datalist_resolves_relative_paths_and_reports_errors(tmp_path):
    path = write_json_atomic({"training": [{"image": "a/b.nii.gz", "label": 0}]}, tmp_path / "dl.json")
    items = load_datalist(path)
    assert items[0]["image"] == str(tmp_path / "a" / "b.nii.gz")
    with pytest.raises(ValueError, match="no 'test' list"):
        load_datalist(path, "test")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_datalist(tmp_path / "missing.json")


def test_bids_entities():
    assert bids_entities("/d/sub-01/ses-M000/anat/sub-01_ses-M000_T1w.nii.gz") == {
        "participant_id": "sub-01", "session_id": "ses-M000"
    }
    assert bids_entities("/d/scan.nii") == {"participant_id": "", "session_id": ""}


def test_resolve_inputs_folder_file_list_and_datalist(tmp_path):
    for name in ("sub-02/ses-A/sub-02_ses-A_T1w.nii.gz", "sub-01/x.nii", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    folder = resolve_inputs(tmp_path)
    assert [i["image"] for i in folder] == [str(tmp_path / "sub-01/x.nii"), str(tmp_path / "sub-02/ses-A/sub-02_ses-A_T1w.nii.gz")]
    assert folder[1]["participant_id"] == "sub-02" and folder[1]["session_id"] == "ses-A"
    assert folder[0]["participant_id"] == "sub-01"
    single = resolve_inputs(tmp_path / "sub-01/x.nii")
    assert len(single) == 1
    (tmp_path / "list.tsv").write_text("image\tsite\nsub-01/x.nii\tP1\n")
    listed = resolve_inputs(tmp_path / "list.tsv")
    assert listed == [{"site": "P1", "image": str(tmp_path / "sub-01/x.nii"), "participant_id": "sub-01", "session_id": ""}]
    (tmp_path / "dl.json").write_text(json.dumps({"test": [{"image": "sub-01/x.nii", "participant_id": "P"}]}))
    assert resolve_inputs(tmp_path / "dl.json")[0]["participant_id"] == "P"
    with pytest.raises(FileNotFoundError):
        resolve_inputs(tmp_path / "nope.nii.gz")
    with pytest.raises(ValueError, match="not a datalist"):
        resolve_inputs(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .nii"):
        resolve_inputs(tmp_path / "empty")


def test_caps_tree_yields_its_t1_linear_images(tmp_path):
    stem = "space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w"
    _touch(tmp_path, f"subjects/sub-01/ses-M000/t1_linear/sub-01_ses-M000_{stem}.nii.gz",
           f"subjects/sub-01/ses-M000/t1_linear/sub-01_ses-M000_{stem}.json",
           "subjects/sub-01/ses-M000/t1_linear/sub-01_ses-M000_space-MNI152NLin2009cSym_res-1x1x1_affine.mat",
           f"subjects/sub-02/ses-M006/t1_linear/sub-02_ses-M006_{stem}.nii.gz", "t1-linear.tsv")
    layout, paths = find_scan_paths(tmp_path)
    assert layout == "caps" and [p.name for p in paths] == [f"sub-01_ses-M000_{stem}.nii.gz", f"sub-02_ses-M006_{stem}.nii.gz"]
    items = resolve_inputs(tmp_path)
    assert [(i["participant_id"], i["session_id"]) for i in items] == [("sub-01", "ses-M000"), ("sub-02", "ses-M006")]


def test_bids_needs_t1w_images_in_anat_folders(tmp_path):
    _touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_FLAIR.nii.gz",
           "sub-02/ses-A/anat/sub-02_ses-A_run-2_T1w.nii", "sub-02/ses-A/func/sub-02_ses-A_bold.nii.gz")
    layout, paths = find_scan_paths(tmp_path)
    assert layout == "bids"
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-A/anat/sub-02_ses-A_run-2_T1w.nii"]


def test_dicom_series_folders_with_extra_files_symlinks_and_loops(tmp_path):
    data = tmp_path / "data"
    for k in range(3):
        _dicom_file(data / "p1" / "series" / f"IM{k}")
    _touch(data, "p1/series/notes.txt", "p1/series/thumbs/preview.png")  # still a series (defect 7)
    _touch(data, "p2/a.mha", "p2/b.hdr", "p2/b.img", "p2/.hidden.nii", "p2/readme.md")
    outside = tmp_path / "outside"
    _touch(outside, "c.nii.gz")
    os.symlink(outside, data / "linked")  # followed once
    os.symlink(data, data / "p2" / "loop")  # a loop: not followed again
    layout, paths = find_scan_paths(data)
    assert layout == "folder"
    assert [p.relative_to(data).as_posix() for p in paths] == ["linked/c.nii.gz", "p1/series", "p2/a.mha", "p2/b.hdr"]
    assert find_scan_paths(data / "p1" / "series") == ("dicom", [data / "p1" / "series"])  # a series is one scan
    assert not is_dicom_series_folder(data / "p2")
    _touch(tmp_path, "old/acr/IMG001", "old/acr/IMG002")  # no marker, extension-less leaf folder: ACR-NEMA
    assert is_dicom_series_folder(tmp_path / "old" / "acr") and not is_dicom_series_folder(tmp_path / "old")


def test_strict_raises_where_lenient_keeps_an_item(tmp_path):
    _touch(tmp_path, "a.nii.gz", "notes.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.csv").write_text("\ufeffimage,site\na.nii.gz,P1\n,P2\nmissing.nii.gz,P3\n", encoding="utf-8")
    lenient = resolve_inputs(tmp_path / "list.csv", strict=False)
    assert [os.path.basename(i["image"]) for i in lenient] == ["a.nii.gz", "list.csv line 3: empty 'image' cell", "missing.nii.gz"]
    assert [i["site"] for i in lenient] == ["P1", "P2", "P3"]  # the byte-order mark did not eat the first column
    with pytest.raises(ValueError, match="line 3: empty 'image' cell"):
        resolve_inputs(tmp_path / "list.csv")
    with pytest.raises(FileNotFoundError):
        resolve_inputs([str(tmp_path / "a.nii.gz"), str(tmp_path / "missing.nii.gz")])
    listed = resolve_inputs([str(tmp_path / "a.nii.gz"), str(tmp_path / "missing.nii.gz"), str(tmp_path / "a.nii.gz")], strict=False)
    assert [os.path.basename(i["image"]) for i in listed] == ["a.nii.gz", "missing.nii.gz"]  # duplicates once
    assert resolve_inputs(tmp_path / "empty", strict=False) == []
    assert [os.path.basename(i["image"]) for i in resolve_inputs(tmp_path / "notes.txt", strict=False)] == ["notes.txt"]
    for source in (tmp_path / "nowhere", tmp_path / "nowhere.csv"):
        for strict in (True, False):
            with pytest.raises(FileNotFoundError):
                resolve_inputs(source, strict=strict)


def test_the_three_callers_agree_on_a_folder(tmp_path):
    """Issue 14: QC, inference datalists and batch preprocessing had three resolvers with different rules."""
    from scripts.preprocessing import find_scans
    from scripts.qc import collect_inputs

    _touch(tmp_path, "site/a.nii.gz", "site/b.nrrd", "notes.txt")
    for k in range(2):
        _dicom_file(tmp_path / "site" / "dicom" / f"{k}.dcm")
    expected = sorted(str(p) for p in (tmp_path / "site/a.nii.gz", tmp_path / "site/b.nrrd", tmp_path / "site/dicom"))
    assert sorted(i["image"] for i in resolve_inputs(tmp_path)) == expected
    assert sorted(i["image"] for i in collect_inputs(tmp_path)) == expected
    assert sorted(str(s.path) for s in find_scans(tmp_path)) == expected
