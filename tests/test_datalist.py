"""Tests of scripts.datalist: participant-level splits, class weights, clinical ratings (reading datalists and
inference inputs: tests/test_common_inputs.py)."""

import json

import pytest
import torch

from scripts.datalist import class_weights, split_participants


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


# ---- clinical ratings: consensus, task labels, grouped stratified folds, rater agreement ----
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from scripts.datalist import (  # noqa: E402
    clinical_datalist,
    clinical_splits,
    consensus_grade,
    rater_agreement,
    read_ratings,
    task_items,
    task_label,
)

HAND_TSV = (
    "participant_id\tsession_id\timage\trater_1\trater_2\n"
    "sub-01\tses-1\ta.nii.gz\t0\t0\n"  # grade 0
    "sub-01\tses-2\tb.nii.gz\t0\t1\n"  # grade 1 (max)
    "sub-02\tses-1\tc.nii.gz\t2\t1\n"  # grade 2
    "sub-03\tses-1\td.nii.gz\tSR\tSR\n"  # straight reject
    "sub-04\tses-1\te.nii.gz\t1\t\n"  # grade 1, second rating missing
    "sub-05\tses-1\tf.nii.gz\t0\tsr\n"  # one rater rejects: excluded
    "sub-06\tses-1\tg.nii.gz\t\t\n"  # nobody graded it: excluded
)


def test_consensus_and_task_mapping_on_hand_made_tsv(tmp_path):
    (tmp_path / "ratings.tsv").write_text(HAND_TSV)
    items = read_ratings(tmp_path / "ratings.tsv")
    assert [(Path(it["image"]).name, it["grade"]) for it in items] == [
        ("a.nii.gz", 0), ("b.nii.gz", 1), ("c.nii.gz", 2), ("e.nii.gz", 1)
    ]
    assert items[0]["image"] == str(tmp_path / "a.nii.gz")
    assert items[3]["ratings"] == {"rater_1": 1, "rater_2": None}
    severe = task_items(items, "mov01vs2")
    assert [(Path(it["image"]).name, it["label"]) for it in severe] == [
        ("a.nii.gz", 0), ("b.nii.gz", 0), ("c.nii.gz", 1), ("e.nii.gz", 0)
    ]
    mild = task_items(items, "mov0vs1")
    assert [(Path(it["image"]).name, it["label"]) for it in mild] == [("a.nii.gz", 0), ("b.nii.gz", 1), ("e.nii.gz", 1)]
    assert consensus_grade([None, 2, 1]) == 2 and consensus_grade(["SR", 0]) is None and consensus_grade([None]) is None
    assert [task_label(g, "mov0vs1") for g in (0, 1, 2)] == [0, 1, None]
    with pytest.raises(ValueError, match="unknown task"):
        task_label(1, "severe")


def test_read_ratings_names_file_and_line_of_a_bad_grade(tmp_path):
    (tmp_path / "r.tsv").write_text("participant_id\tsession_id\timage\trater_1\nsub-1\tses-1\ta.nii.gz\t0\nsub-2\tses-1\tb.nii.gz\t3\n")
    with pytest.raises(ValueError, match=r"r\.tsv, line 3, column rater_1: grade '3'"):
        read_ratings(tmp_path / "r.tsv")
    (tmp_path / "n.tsv").write_text("participant_id\timage\n")
    with pytest.raises(ValueError, match="missing column"):
        read_ratings(tmp_path / "n.tsv")


def _many_items(n_participants=40, seed=0):
    rng = np.random.RandomState(seed)
    items = []
    for p in range(n_participants):
        for s in range(rng.randint(1, 4)):
            items.append({"image": f"p{p}_s{s}.nii.gz", "participant_id": f"sub-{p:03d}", "session_id": f"ses-{s}",
                          "grade": int(rng.choice(3, p=[0.5, 0.3, 0.2]))})
    return items


def test_clinical_splits_never_share_a_participant_and_are_stratified():
    items = _many_items()
    test, folds = clinical_splits(items, n_folds=4, test_fraction=0.2, seed=3)
    parts = [test] + folds
    assert sum(len(p) for p in parts) == len(items)  # every image in exactly one part
    participants = [{it["participant_id"] for it in p} for p in parts]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not participants[i] & participants[j]
    for part in parts:  # each part holds every grade
        assert set(Counter(it["grade"] for it in part)) == {0, 1, 2}
    assert 0.1 < len(test) / len(items) < 0.3
    again, _ = clinical_splits(items, n_folds=4, test_fraction=0.2, seed=3)
    assert again == test


def test_clinical_datalist_folds_share_the_test_set(tmp_path):
    rows = ["participant_id\tsession_id\timage\trater_1\trater_2"]
    for it in _many_items(30, seed=1):
        rows.append(f"{it['participant_id']}\t{it['session_id']}\t{it['image']}\t{it['grade']}\t{max(0, it['grade'] - 1)}")
    (tmp_path / "ratings.tsv").write_text("\n".join(rows) + "\n")
    lists = [json.loads(clinical_datalist(tmp_path / "ratings.tsv", "mov01vs2", k, 3, output_dir=tmp_path / "s").read_text()) for k in range(3)]
    assert all(d["test"] == lists[0]["test"] for d in lists)
    validation = [{it["image"] for it in d["validation"]} for d in lists]
    assert not (validation[0] & validation[1]) and not (validation[1] & validation[2])
    for d in lists:
        assert not {it["participant_id"] for it in d["training"]} & {it["participant_id"] for it in d["validation"]}
        assert all(it["label"] == int(it["grade"] == 2) for s in d.values() for it in s)
    mild = json.loads(clinical_datalist(tmp_path / "ratings.tsv", "mov0vs1", 0, 3, output_dir=tmp_path / "s").read_text())
    assert all(it["grade"] < 2 and it["label"] == it["grade"] for s in mild.values() for it in s)
    with pytest.raises(ValueError, match="fold must be"):
        clinical_datalist(tmp_path / "ratings.tsv", "mov01vs2", 3, 3)


def test_rater_agreement_hand_computed(tmp_path):
    (tmp_path / "ratings.tsv").write_text(HAND_TSV)
    result = rater_agreement(read_ratings(tmp_path / "ratings.tsv"), "mov01vs2")
    # pairs rated by both: (0,0), (0,1), (2,1); linear weights |i-j|/2: observed disagreement 1/3,
    # expected from the marginals (r1: 0 2/3, 2 1/3; r2: 0 1/3, 1 2/3) 4/9 -> kappa = 1 - 3/4
    assert result["kappa"]["rater_1 vs rater_2"] == {"kappa": pytest.approx(0.25), "n": 3}
    assert result["raters"]["rater_1"]["balanced_accuracy"] == 1.0
    # rater_2 on a, b, c: labels 0 0 0 against consensus 0 0 1 -> sensitivity 0, specificity 1
    assert result["raters"]["rater_2"] == {"n": 3, "balanced_accuracy": 0.5, "sensitivity": 0.0, "specificity": 1.0}
