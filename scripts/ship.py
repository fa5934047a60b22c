"""Turn a training run into the shipped weights: ``models/model.pt`` (mostly float16), its sha256 and threshold.

    python -m scripts.ship --checkpoint runs/pretrain/last.pt --validation runs/pretrain/validation/datalist.json

Steps, each checked:

1. the network state is read from a training checkpoint (``last.pt``: its ``model`` entry) or a plain
   state dict, and its large tensors stored in float16 (``models/model.pt`` must stay under 95 MB; Conv5FC3
   has 42.3 M parameters, 41.9 M of them in the first fully connected weight: 85 MB with that one in
   float16 and the rest in float32, :func:`to_half`). Loading casts it back to float32 (``load_state_dict`` copies into
   the float32 parameters), so nothing that loads the weights changes;
2. float16 against float32: the motion probabilities of the validation images must agree within
   ``--tolerance`` (1e-3), else nothing is written;
3. the decision threshold is chosen on the validation images (Youden's J by default) and written to
   ``models/threshold.json``, which ``configs/inference.yaml`` reads by default;
4. ``large_files.yml`` at the bundle root lists ``models/model.pt`` with its sha256 (checked at every
   load by :mod:`scripts.integrity`).

Everything is written through temporary files and renames; an existing ``models/model.pt`` is
replaced only when all checks pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from scripts.common.files import atomic_write, write_json_atomic
from scripts.datalist import load_datalist
from scripts.integrity import file_hash
from scripts.metrics import binary_metrics, choose_threshold

__all__ = ["read_state", "to_half", "validation_probabilities", "ship", "MAX_BYTES"]

logger = logging.getLogger(__name__)
MAX_BYTES = 95 * 1000 * 1000
_ROOT = Path(__file__).resolve().parents[1]


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network state dict in ``path``: a training checkpoint's ``model`` entry, or the file itself."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict or a checkpoint holding one")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: the network state holds values that are not tensors")
    return dict(state)


def to_half(state: Mapping[str, torch.Tensor], min_numel: int = 1_000_000) -> dict[str, torch.Tensor]:
    """Floating-point tensors of at least ``min_numel`` elements in float16; the others stay as they are.

    In Conv5FC3 the first fully connected weight holds 99 % of the parameters (41.9 M of 42.3 M): in
    float16 it keeps the file under 95 MB, while the convolutions and BatchNorm statistics, where float16
    rounding moved validation probabilities by up to 1.9e-3 (measured on the 0.5.0 candidates), stay float32.
    """
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.numel() >= min_numel:
            if v.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"{k}: values beyond the float16 range; ship float32 instead")
            out[k] = v.to(torch.float16)
        else:
            out[k] = v.clone()
    return out


def _inference_parts(bundle_root: Path, spatial_size: Sequence[int] | None) -> tuple[Any, Any]:
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(str(bundle_root / "configs" / "inference.yaml"))
    config["bundle_root"] = str(bundle_root)
    if spatial_size is not None:
        config["spatial_size"] = list(spatial_size)
    return config.get_parsed_content("network_def"), config.get_parsed_content("preprocessing")


@torch.no_grad()
def validation_probabilities(
    state: Mapping[str, torch.Tensor],
    items: Sequence[Mapping[str, Any]],
    bundle_root: Path = _ROOT,
    spatial_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Motion probabilities of ``items`` (datalist entries) through inference.yaml's preprocessing and network."""
    network, preprocessing = _inference_parts(bundle_root, spatial_size)
    network.load_state_dict(state)
    network = network.float().eval().to(memory_format=torch.channels_last_3d)
    probs = []
    for item in items:
        x = torch.as_tensor(preprocessing(dict(item))["image"])[None].contiguous(memory_format=torch.channels_last_3d)
        probs.append(float(torch.softmax(network(x), dim=1)[0, 1]))
    return np.asarray(probs)


def _write_large_files(bundle_root: Path, rel: str, sha256: str) -> Path:
    path = bundle_root / "large_files.yml"
    content: dict[str, Any] = {"large_files": []}
    if path.is_file():
        content = yaml.safe_load(path.read_text()) or content
    entries = [e for e in content.get("large_files", []) if e.get("path") != rel]
    entries.insert(0, {"path": rel, "hash_val": sha256, "hash_type": "sha256"})
    content["large_files"] = entries
    text = (
        "# Large files of the bundle; scripts/integrity.py checks each hash at every load.\n"
        "# models/model.pt is committed in the repository (float16 state dict, loaded into float32).\n"
        + yaml.safe_dump(content, sort_keys=False)
    )
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def ship(
    checkpoint: str | os.PathLike,
    validation: str | os.PathLike,
    bundle_root: str | os.PathLike = _ROOT,
    key: str = "validation",
    method: str = "youden",
    target_specificity: float = 0.95,
    tolerance: float = 1e-3,
    spatial_size: Sequence[int] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``models/model.pt`` (float16), ``models/threshold.json`` and ``large_files.yml``; return a summary."""
    root = Path(bundle_root)
    state = read_state(checkpoint)
    half = to_half(state)
    items = load_datalist(validation, key)
    labels = np.asarray([int(it["label"]) for it in items])
    p32 = validation_probabilities(state, items, root, spatial_size)
    p16 = validation_probabilities(half, items, root, spatial_size)
    gap = float(np.abs(p32 - p16).max())
    if gap > tolerance:
        raise ValueError(f"float16 weights change a validation probability by {gap:.2e} > {tolerance:g}; not shipped")
    selection = choose_threshold(labels, p16, method=method, target_specificity=target_specificity)
    metrics = binary_metrics(labels, p16, float(selection["threshold"])).as_dict()
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / "model.pt"

    def write(tmp: Path) -> None:  # refused before it replaces anything
        torch.save(half, tmp)
        if tmp.stat().st_size > MAX_BYTES:
            raise ValueError(f"{tmp.stat().st_size} bytes > {MAX_BYTES}: too large to commit")

    atomic_write(target, write)
    size = target.stat().st_size
    sha = file_hash(target, "sha256")
    _write_large_files(root, "models/model.pt", sha)
    record = (
        dict(selection)
        | {
            "chosen_on": f"{len(items)} validation images ({int(labels.sum())} moved) of {Path(validation).name}",
            "validation_metrics": metrics,
            "model_sha256": sha,
            "float16_max_probability_difference": gap,
        }
        | dict(provenance or {})
    )
    write_json_atomic(record, models / "threshold.json")
    logger.info("shipped %s (%d bytes, sha256 %s), threshold %.4f", target, size, sha, selection["threshold"])
    return {"path": str(target), "bytes": size, "sha256": sha} | record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ship a trained network as models/model.pt (float16).")
    parser.add_argument("--checkpoint", default="runs/pretrain/last.pt")
    parser.add_argument("--validation", default="runs/pretrain/validation/datalist.json")
    parser.add_argument("--key", default="validation")
    parser.add_argument("--method", default="youden", choices=["youden", "specificity"])
    parser.add_argument("--target_specificity", type=float, default=0.95)
    parser.add_argument("--provenance", default=None, help="JSON file of facts to record beside the threshold")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    provenance = json.loads(Path(args.provenance).read_text()) if args.provenance else None
    summary = ship(
        args.checkpoint,
        args.validation,
        key=args.key,
        method=args.method,
        target_specificity=args.target_specificity,
        provenance=provenance,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
