"""Datalists: reading and writing them, participant-level splits, class weights, inference inputs.

A datalist is a decathlon-style JSON file ``{"training": [...], "validation": [...], "test": [...]}``
whose items are at least ``{"image": path, "label": int}`` plus ``participant_id`` and
``session_id`` where known. Relative image paths are relative to the datalist's folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SPLITS",
    "NIFTI_SUFFIXES",
    "load_datalist",
    "write_json_atomic",
    "split_participants",
    "class_weights",
    "bids_entities",
    "resolve_inputs",
]

SPLITS = ("training", "validation", "test")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=4) + "\n")
    os.replace(tmp, path)
    return path


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict[str, Any]]:
    """Items of split ``key`` of a datalist JSON file, with image paths made absolute.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON, lacks the split, or an item lacks ``image``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    if key not in content:
        raise ValueError(f"datalist {path} has no '{key}' list (it has {sorted(content)}).")
    items = []
    for i, item in enumerate(content[key]):
        if "image" not in item:
            raise ValueError(f"datalist {path}: item {i} of '{key}' has no 'image'.")
        item = dict(item)
        image = Path(os.path.expanduser(str(item["image"])))
        item["image"] = str(image if image.is_absolute() else (path.parent / image))
        items.append(item)
    return items


def split_participants(
    items: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
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
        assignment[participants[idx]] = SPLITS[0] if rank < n_train else SPLITS[1] if rank < n_train + n_val else SPLITS[2]
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for it in items:
        out[assignment[str(it["participant_id"])]].append(dict(it))
    return out


def class_weights(
    items: Sequence[Mapping[str, Any]],
    num_classes: int = 2,
    motion_prob: float = 0.0,
    label_key: str = "label",
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


_ENTITY = re.compile(r"(sub|ses)-([A-Za-z0-9]+)")


def bids_entities(path: str | os.PathLike) -> dict[str, str]:
    """``participant_id`` and ``session_id`` read from BIDS/CAPS names (``sub-X``, ``ses-Y``) in a path.

    The file name wins over folder names; missing entities are empty strings.
    """
    found: dict[str, str] = {}
    for part in Path(path).parts:  # later parts (the file name) override folders
        for key, value in _ENTITY.findall(part):
            found[key] = f"{key}-{value}"
    return {"participant_id": found.get("sub", ""), "session_id": found.get("ses", "")}


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def resolve_inputs(source: str | os.PathLike | Iterable[str], datalist_key: str = "test") -> list[dict[str, Any]]:
    """Turn what a user points inference at into datalist items ``{"image", "participant_id", "session_id"}``.

    ``source`` may be:
      - a datalist JSON file (items of ``datalist_key``),
      - a CSV/TSV file with an ``image`` (or ``path``) column, relative paths resolved against its folder,
      - a folder, searched recursively for ``.nii``/``.nii.gz`` files (sorted),
      - one NIfTI file,
      - a list of any of these.

    Raises:
        FileNotFoundError: a path does not exist. ValueError: nothing usable was found.
    """
    if not isinstance(source, (str, os.PathLike)):
        return [item for s in source for item in resolve_inputs(s, datalist_key)]
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        raise FileNotFoundError(f"inference input {path} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_nifti(p))
        if not files:
            raise ValueError(f"folder {path} contains no .nii or .nii.gz file.")
        items = [{"image": str(p)} for p in files]
    elif path.suffix == ".json":
        items = load_datalist(path, datalist_key)
    elif path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        column = next((c for c in ("image", "path") if rows and c in rows[0]), None)
        if column is None:
            raise ValueError(f"{path} needs an 'image' or 'path' column.")
        items = []
        for row in rows:
            image = Path(row.pop(column))
            items.append({**row, "image": str(image if image.is_absolute() else path.parent / image)})
    elif _is_nifti(path):
        items = [{"image": str(path)}]
    else:
        raise ValueError(f"{path} is not a datalist (.json), a list (.csv/.tsv), a folder or a NIfTI file.")
    for item in items:
        for key, value in bids_entities(item["image"]).items():
            if not item.get(key):
                item[key] = value
    return items
