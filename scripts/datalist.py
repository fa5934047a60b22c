"""Datalists: participant-level splits, class weights, clinical ratings (reading them and inference inputs:
:mod:`scripts.common.inputs`).

A datalist is a decathlon-style JSON file ``{"training": [...], "validation": [...], "test": [...]}``
whose items are at least ``{"image": path, "label": int}`` plus ``participant_id`` and
``session_id`` where known. Relative image paths are relative to the datalist's folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.common.files import write_json_atomic  # noqa: F401 - re-exported: datalists are written with it

# re-exported: configs read datalists as scripts.datalist.load_datalist; the resolver lives in the bottom layer
from scripts.common.inputs import bids_entities, load_datalist, resolve_inputs  # noqa: F401

__all__ = [
    "SPLITS",
    "load_datalist",
    "write_json_atomic",
    "split_participants",
    "class_weights",
    "bids_entities",
    "resolve_inputs",
    "TASKS",
    "GRADES",
    "read_ratings",
    "consensus_grade",
    "task_label",
    "task_items",
    "clinical_splits",
    "clinical_datalist",
    "rater_agreement",
]

SPLITS = ("training", "validation", "test")


def split_participants(
    items: Sequence[Mapping[str, Any]], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Split items into training/validation/test at the participant level.

    All sessions of a participant land in the same split. Participants are shuffled with ``seed``
    and assigned in order, the split sizes (in participants) rounded so that each non-zero fraction
    gets at least one participant when there are enough.

    Args:
        items: datalist items with a ``participant_id``.
        fractions: fractions of participants for training, validation and test (sum 1).
        seed: shuffling seed.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}.")
    missing = [i for i, it in enumerate(items) if not it.get("participant_id")]
    if missing:
        raise ValueError(f"items {missing[:5]} have no participant_id; cannot split by participant.")
    participants = sorted({str(it["participant_id"]) for it in items})
    order = np.random.RandomState(seed).permutation(len(participants))
    n = len(participants)
    n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 and n >= 3 else round(fractions[1] * n)
    n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 and n >= 3 else round(fractions[2] * n)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} participants are too few for the fractions {tuple(fractions)}.")
    assignment = {}
    for rank, idx in enumerate(order):
        assignment[participants[idx]] = (
            SPLITS[0] if rank < n_train else SPLITS[1] if rank < n_train + n_val else SPLITS[2]
        )
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for it in items:
        out[assignment[str(it["participant_id"])]].append(dict(it))
    return out


def class_weights(
    items: Sequence[Mapping[str, Any]], num_classes: int = 2, motion_prob: float = 0.0, label_key: str = "label"
) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (num_classes * n_c)`` from a training datalist.

    In stage-1 pre-training labels are made on the fly: an image labelled 0 becomes 1 with
    probability ``motion_prob``. The weights then use the expected class counts. A class that can
    never occur gets weight 0 (it contributes no loss anyway).
    """
    if not items:
        raise ValueError("cannot compute class weights of an empty datalist.")
    labels = np.array([int(it.get(label_key, 0)) for it in items])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got {sorted(set(labels.tolist()))}.")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if motion_prob:
        moved = counts[0] * float(motion_prob)
        counts[0] -= moved
        counts[1] += moved
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1e-12)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Clinical data: rater grades, consensus, task labels, cross-validation splits, rater agreement
# ---------------------------------------------------------------------------------------------

#: motion grades: 0 no motion, 1 mild, 2 severe.
GRADES = (0, 1, 2)
#: binary tasks: mov01vs2 (severe vs the rest), mov0vs1 (mild vs none; severe images left out).
TASKS = ("mov01vs2", "mov0vs1")
_REJECT = "SR"


def _parse_grade(value: Any, where: str) -> int | str | None:
    """A rater's cell: 0/1/2 -> int, ``SR`` -> "SR", empty -> None (not rated)."""
    text = "" if value is None else str(value).strip()
    if text == "" or text.lower() in ("na", "n/a", "nan"):
        return None
    if text.upper() == _REJECT:
        return _REJECT
    try:
        grade = int(float(text))
    except ValueError:
        grade = -1
    if grade not in GRADES or float(text) != grade:
        raise ValueError(f"{where}: grade {text!r} is not 0, 1, 2, SR or empty.")
    return grade


def consensus_grade(grades: Sequence[int | str | None]) -> int | None:
    """Consensus of one image's rater grades: the maximum grade, or None when the image is excluded.

    An image is excluded when any rater marked it a straight reject (``SR``: not a usable T1w) or
    when no rater graded it. Empty ratings (None) are ignored otherwise.
    """
    if any(g == _REJECT for g in grades):
        return None
    given = [int(g) for g in grades if g is not None]
    return max(given) if given else None


def task_label(grade: int, task: str) -> int | None:
    """Binary label of a consensus grade for ``task`` (None: the image is not part of the task).

    mov01vs2: 1 if grade 2, else 0. mov0vs1: grade 2 left out; 1 if grade 1, else 0.
    """
    if task == "mov01vs2":
        return int(grade == 2)
    if task == "mov0vs1":
        return None if grade == 2 else int(grade == 1)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}.")


def read_ratings(path: str | os.PathLike, rater_columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read a clinical rater TSV into items with their consensus grade; straight rejects are dropped.

    The TSV has columns ``participant_id, session_id, image, rater_1, rater_2, ...`` (rater columns:
    those whose name starts with ``rater``, or ``rater_columns``), grades 0/1/2, ``SR`` or empty.
    Relative image paths are resolved against the TSV's folder. Each returned item is
    ``{"image", "participant_id", "session_id", "grade", "ratings": {rater: grade or None}}``.

    Raises:
        FileNotFoundError: no file. ValueError: a required column is missing or a cell is not a grade
        (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ratings file {path} does not exist.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = list(reader.fieldnames or [])
        raters = list(rater_columns) if rater_columns else [c for c in columns if c.lower().startswith("rater")]
        missing = [c for c in ("participant_id", "image", *raters) if c not in columns]
        if missing or not raters:
            raise ValueError(f"{path}: missing column(s) {missing or ['rater_1']} (has {columns}).")
        items = []
        for line, row in enumerate(reader, start=2):
            ratings = {r: _parse_grade(row.get(r), f"{path}, line {line}, column {r}") for r in raters}
            grade = consensus_grade(list(ratings.values()))
            if grade is None:
                continue
            image = Path(os.path.expanduser(row["image"]))
            items.append(
                {
                    "image": str(image if image.is_absolute() else path.parent / image),
                    "participant_id": row["participant_id"],
                    "session_id": row.get("session_id", ""),
                    "grade": grade,
                    "ratings": ratings,
                }
            )
    if not items:
        raise ValueError(f"{path}: no usable image (all rejected or unrated).")
    return items


def task_items(items: Sequence[Mapping[str, Any]], task: str) -> list[dict[str, Any]]:
    """Items of ``task`` with their binary ``label`` (images outside the task, e.g. severe in mov0vs1, dropped)."""
    out = []
    for it in items:
        label = task_label(int(it["grade"]), task)
        if label is not None:
            out.append({k: v for k, v in it.items() if k != "ratings"} | {"label": label})
    return out


def clinical_splits(
    items: Sequence[Mapping[str, Any]],
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify_key: str = "grade",
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """A participant-grouped, stratified held-out test set and K cross-validation folds of the rest.

    Stratification uses ``stratify_key`` (the consensus grade by default, so that both tasks share
    one test set and one set of folds); groups are participants, so all sessions of a participant fall
    in the same part. Returns ``(test_items, folds)`` where ``folds[k]`` are the validation items of
    fold k (its training items are the other folds).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if any(not it.get("participant_id") for it in items):
        raise ValueError("every item needs a participant_id to split by participant.")
    items = [dict(it) for it in items]
    groups = np.array([str(it["participant_id"]) for it in items])
    strata = np.array([int(it[stratify_key]) for it in items])
    n_groups = len(set(groups.tolist()))
    n_test_splits = max(2, round(1.0 / test_fraction))
    if n_groups < n_test_splits or n_groups - n_groups // n_test_splits < n_folds:
        raise ValueError(
            f"{n_groups} participants are too few for a test fraction of {test_fraction} and {n_folds} folds."
        )
    import warnings

    with warnings.catch_warnings():  # small classes: sklearn warns that a class has fewer members than splits
        warnings.simplefilter("ignore", UserWarning)
        outer = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=seed)
        rest_idx, test_idx = next(outer.split(np.zeros(len(items)), strata, groups))
        inner = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        folds = [
            [items[rest_idx[i]] for i in val]
            for _, val in inner.split(np.zeros(len(rest_idx)), strata[rest_idx], groups[rest_idx])
        ]
    return [items[i] for i in test_idx], folds


def clinical_datalist(
    ratings: str | os.PathLike,
    task: str = "mov01vs2",
    fold: int = 0,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the datalist of one cross-validation fold of a clinical task and return its path.

    The rater TSV gives consensus grades (:func:`read_ratings`); :func:`clinical_splits` makes the
    test set and folds on all usable images, then the task's labels are applied (images outside the
    task dropped). Fold ``fold`` is validation, the other folds training. The JSON is written to
    ``<output_dir>/datalist_<task>_fold-<fold>.json`` (default: next to the TSV) with absolute image
    paths; the result is the same for the same inputs, so evaluation can rebuild it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}.")
    if not 0 <= int(fold) < int(n_folds):
        raise ValueError(f"fold must be in [0, {n_folds - 1}], got {fold}.")
    items = read_ratings(ratings)
    test, folds = clinical_splits(items, int(n_folds), float(test_fraction), int(seed))
    training = [it for k, f in enumerate(folds) if k != int(fold) for it in f]
    datalist = {
        "training": task_items(training, task),
        "validation": task_items(folds[int(fold)], task),
        "test": task_items(test, task),
    }
    for split, split_items in datalist.items():
        if not split_items:
            raise ValueError(f"{ratings}: the {split} split of task {task}, fold {fold} is empty.")
    out_dir = Path(output_dir) if output_dir else Path(ratings).parent
    return write_json_atomic(datalist, out_dir / f"datalist_{task}_fold-{int(fold)}.json")


def rater_agreement(
    items: Sequence[Mapping[str, Any]], task: str = "mov01vs2", weights: str = "linear"
) -> dict[str, Any]:
    """Agreement of the raters: the "manual annotations" row of Table IV.

    Args:
        items: output of :func:`read_ratings` (consensus grade and per-rater grades).
        task: task whose labels each rater is scored on against the consensus.
        weights: weighting of Cohen's kappa on the 0/1/2 grades (``"linear"`` or ``"quadratic"``).

    Returns:
        ``{"kappa": {"rater_1 vs rater_2": {"kappa", "n"}}, "raters": {rater: {"n", "balanced_accuracy",
        "sensitivity", "specificity"}}}``. Pairs and raters use only the images each rater graded; a
        rater is scored on the task images it graded, its grade mapped to the task label (a grade
        outside the task, e.g. 2 in mov0vs1, counts as the positive class).
    """
    from sklearn.metrics import cohen_kappa_score

    from scripts.metrics import binary_metrics

    raters = sorted({r for it in items for r in it["ratings"]})
    kappas = {}
    for i, a in enumerate(raters):
        for b in raters[i + 1 :]:
            pairs = [
                (it["ratings"][a], it["ratings"][b])
                for it in items
                if it["ratings"].get(a) is not None and it["ratings"].get(b) is not None
            ]
            if len(pairs) < 2:
                continue
            ga, gb = zip(*pairs)
            k = cohen_kappa_score(ga, gb, labels=list(GRADES), weights=weights)
            kappas[f"{a} vs {b}"] = {"kappa": None if np.isnan(k) else float(k), "n": len(pairs)}
    scores = {}
    for r in raters:
        ys, ps = [], []
        for it in items:
            truth = task_label(int(it["grade"]), task)
            g = it["ratings"].get(r)
            if truth is None or g is None:
                continue
            ys.append(truth)
            ps.append(float(task_label(int(g), "mov01vs2") if task == "mov01vs2" else int(g >= 1)))
        if ys:
            m = binary_metrics(ys, ps).as_dict()
            scores[r] = {k: m[k] for k in ("n", "balanced_accuracy", "sensitivity", "specificity")}
    return {"task": task, "weights": weights, "kappa": kappas, "raters": scores}
