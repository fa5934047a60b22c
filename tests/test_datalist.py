"""Tests of scripts.datalist: loading, participant-level splits, class weights, inference inputs."""

import json

import pytest
import torch

from scripts.datalist import (
    bids_entities,
    class_weights,
    load_datalist,
    resolve_inputs,
    split_participants,
    write_json_atomic,
)


def _items(n_participants, sessions=2):
    return [
        {"image": f"sub-{p:02d}_ses-{s}.nii.gz", "label": p % 2, "participant_id": f"sub-{p:02d}", "session_id": f"ses-{s}"}
        for p in range(n_participants)
        for s in range(sessions)
    ]


def test_split_never_shares_a_participant_and_keeps_all_items():
    items = _items(20)
    splits = split_participants(items, (0.6, 0.2, 0.2), seed=3)
    parts = {k: {it["participant_id"] for it in v} for k, v in splits.items()}
    assert not parts["training"] & parts["validation"]
    assert not parts["training"] & parts["test"]
    assert not parts["validation"] & parts["test"]
    assert sum(len(v) for v in splits.values()) == len(items)
    assert [len(parts[k]) for k in ("training", "validation", "test")] == [12, 4, 4]
    assert splits == split_participants(items, (0.6, 0.2, 0.2), seed=3)
    assert splits != split_participants(items, (0.6, 0.2, 0.2), seed=4)


def test_split_small_and_invalid():
    splits = split_participants(_items(3, 1), (0.6, 0.2, 0.2))
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="summing to 1"):
        split_participants(_items(3), (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="participant_id"):
        split_participants([{"image": "a.nii"}], (1.0, 0.0, 0.0))


def test_class_weights_from_labels_and_expected_motion():
    items = [{"label": 0}] * 6 + [{"label": 1}] * 2
    w = class_weights(items)
    assert torch.allclose(w, torch.tensor([8 / (2 * 6), 8 / (2 * 2)]))
    # stage 1: all clean, motion with probability 0.5 -> balanced
    assert torch.allclose(class_weights([{"label": 0}] * 10, motion_prob=0.5), torch.tensor([1.0, 1.0]))
    # motion with probability 0.25 -> expected counts 7.5 / 2.5
    assert torch.allclose(class_weights([{"label": 0}] * 10, motion_prob=0.25), torch.tensor([10 / 15, 10 / 5]))
    with pytest.raises(ValueError, match="labels must be"):
        class_weights([{"label": 3}])


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
