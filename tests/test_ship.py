"""Tests of scripts/ship.py and of the shipped weights in models/ (hash, float16, threshold, QC decisions)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BUNDLE_ROOT, SMALL_SHAPE, SMALL_VOXEL
from scripts import ship
from scripts.datalist import load_datalist
from scripts.integrity import WeightIntegrityError, file_hash, verify_file
from scripts.networks import Conv5FC3
from scripts.synthetic_heads import make_synthetic_dataset

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"


def test_to_half_keeps_integers_and_small_tensors_and_refuses_overflow():
    state = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3, dtype=torch.long), "big": torch.zeros(10)}
    half = ship.to_half(state, min_numel=5)
    assert half["big"].dtype == torch.float16 and half["w"].dtype == torch.float32 and half["n"].dtype == torch.long
    assert ship.to_half(state, min_numel=1)["w"].dtype == torch.float16
    with pytest.raises(ValueError, match="float16"):
        ship.to_half({"w": torch.tensor([1e6])}, min_numel=1)


def test_ship_a_small_model(tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", root / "configs")
    torch.manual_seed(0)
    net = Conv5FC3(input_size=SMALL_SHAPE)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": net.state_dict(), "optimizer": {}}, ckpt)
    val = make_synthetic_dataset(tmp_path / "val", n=6, seed=11, voxel_size=SMALL_VOXEL, resampler="grid_sample")
    items = load_datalist(val, "validation")
    if len({it["label"] for it in items}) < 2:
        pytest.skip("the draw gave one class only")
    summary = ship.ship(ckpt, val, bundle_root=root, spatial_size=SMALL_SHAPE, provenance={"steps": 0})
    weights = root / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    assert state["fc.2.weight"].dtype == torch.float16  # the big fully connected weight
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point() and v.numel() < 1_000_000)
    assert summary["sha256"] == file_hash(weights) and verify_file(weights, root)
    entry = yaml.safe_load((root / "large_files.yml").read_text())["large_files"][0]
    assert entry == {"path": "models/model.pt", "hash_val": summary["sha256"], "hash_type": "sha256"}
    record = json.loads((root / "models" / "threshold.json").read_text())
    assert 0.0 <= record["threshold"] <= 1.0 and record["steps"] == 0
    assert record["float16_max_probability_difference"] <= 1e-3
    # loads into a float32 network, predictions equal to the float32 weights within 1e-3
    p32 = ship.validation_probabilities(net.state_dict(), items, root, SMALL_SHAPE)
    p16 = ship.validation_probabilities(state, items, root, SMALL_SHAPE)
    assert abs(p32 - p16).max() <= 1e-3
    weights.write_bytes(weights.read_bytes()[:-10] + b"0" * 10)  # tampered: refused
    with pytest.raises(WeightIntegrityError):
        verify_file(weights, root)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in models/")
def test_shipped_weights_hash_size_and_keys():
    assert SHIPPED.stat().st_size <= ship.MAX_BYTES
    assert verify_file(SHIPPED, BUNDLE_ROOT)  # large_files.yml publishes its sha256, and it matches
    state = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    net = Conv5FC3()
    net.load_state_dict(state)  # float16 copied into the float32 parameters
    assert next(net.parameters()).dtype == torch.float32
    assert state["fc.2.weight"].dtype == torch.float16 and state["fc.6.weight"].dtype == torch.float32
    threshold = json.loads((BUNDLE_ROOT / "models" / "threshold.json").read_text())
    assert threshold["model_sha256"] == file_hash(SHIPPED)
    assert 0.0 < threshold["threshold"] < 1.0


@pytest.fixture(scope="module")
def demo_qc(tmp_path_factory):
    """The QC job with the shipped model over clean, mildly and severely moved demo scans (1 mm):
    ``(rows of qc.tsv, {resolved path: true grade})``."""
    from scripts.demo import make_clinical_demo

    if not SHIPPED.is_file():
        pytest.skip("no shipped weights in models/")

    root = tmp_path_factory.mktemp("demo_qc")
    tsv = make_clinical_demo(root / "demo", n_participants=6, seed=4, voxel_size=1.0, reject_fraction=0.0,
                             grade_probs=(0.34, 0.33, 0.33))
    with tsv.open() as f:
        truth = {str((root / "demo" / r["image"]).resolve()): int(r["true_grade"])
                 for r in csv.DictReader(f, delimiter="\t")}
    assert set(truth.values()) == {0, 1, 2}
    out = root / "qc"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
                    "--input", str(root / "demo"), "--output_dir", str(out), "--num_workers", "0",
                    "--thumbnails", "false"], cwd=BUNDLE_ROOT, check=True, capture_output=True, timeout=900)
    with (out / "qc.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(truth)
    return rows, truth


def test_qc_job_scores_every_demo_scan_clean_or_moved(demo_qc):
    """Out of the box: no demo head, clean or moved, is refused by a gate; each gets a probability."""
    rows, _ = demo_qc
    for r in rows:
        assert r["status"] in ("ok", "warning"), r
        assert 0.0 <= float(r["prob_motion"]) <= 1.0


def test_qc_job_on_demo_scans_with_the_shipped_model(demo_qc):
    """Out of the box: clean, mildly and severely moved demo scans get the right decisions (the 0.9.0 weights:
    clean 0.002-0.017, mild 0.101-0.157, severe 0.92 against the threshold 0.505; the 0.3.0 weights failed)."""
    rows, truth = demo_qc
    by_grade: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    for r in rows:
        by_grade[truth[str(Path(r["path"]).resolve())]].append(r)
    assert all(r["decision"] == "no_motion" for r in by_grade[0]), by_grade[0]
    assert all(r["decision"] == "motion" for r in by_grade[2]), by_grade[2]
    prob = {g: [float(r["prob_motion"]) for r in rs] for g, rs in by_grade.items()}
    assert min(prob[1]) > max(prob[0])  # mild motion ranks above every clean scan


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in models/")
def test_shipped_model_passes_the_zoo_checks(tmp_path):
    """What the model zoo's verify_bundle does with models/model.pt: required files, TorchScript export."""
    from monai.bundle import ckpt_export

    for required in ("configs/metadata.json", "configs/inference.yaml", "models/model.pt", "LICENSE",
                     "docs/README.md", "docs/data_license.txt", "large_files.yml"):
        assert (BUNDLE_ROOT / required).is_file(), required
    ts = tmp_path / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(SHIPPED),
                meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
                config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"), bundle_root=str(BUNDLE_ROOT))
    scripted = torch.jit.load(str(ts))
    net = Conv5FC3()
    net.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True))
    x = torch.randn(1, 1, 169, 208, 179)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(scripted(x), 1), torch.softmax(net.eval()(x), 1), atol=1e-5)
