"""configs/multi_gpu_train.yaml and configs/multi_gpu_inference.yaml under torchrun: 2 processes on
CPU with the gloo backend, at reduced spatial size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLE_ROOT, SMALL_SHAPE
from ecosystem_helpers import save_small_model

from scripts.qc import QCJob, ScanLoader, read_journal, read_qc_table

CONFIGS = BUNDLE_ROOT / "configs"


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", *args, "--meta_file", str(CONFIGS / "metadata.json")]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_torchrun_training_two_processes_gloo(small_demo, tmp_path):
    proc = _torchrun(
        "training",
        "--config_file", f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']",
        "--bundle_root", str(tmp_path),
        "--dataset_dir", str(small_demo),
        "--spatial_size", str(list(SMALL_SHAPE)),
        "--train#trainer#max_epochs", "2",
        "--batch_size", "2",
        "--micro_batch_size", "2",
        "--num_workers", "0",
        "--logging_file", str(CONFIGS / "logging.conf"),
    )
    state = torch.load(tmp_path / "runs" / "train" / "model.pt", map_location="cpu", weights_only=True)
    assert "fc.6.weight" in state and not any(k.startswith("module.") for k in state)  # the plain network
    log = proc.stdout + proc.stderr
    # only rank 0 logs iterations: each epoch's first iteration line appears once, not twice
    assert log.count("Epoch: 1/2, Iter: 1/") == 1 and log.count("Epoch: 2/2, Iter: 1/") == 1
    events = [p for p in (tmp_path / "eval").iterdir() if p.name.startswith("events.out.tfevents")]
    # TensorBoard writers are created on every rank, but only rank 0's (one process id) hold scalars
    written = {p.name.split(".")[-2] for p in events if p.stat().st_size > 100}
    assert len(written) == 1 and len(events) == 4


def test_torchrun_inference_two_processes_gloo_merges_one_table(small_demo, tmp_path):
    save_small_model(tmp_path / "models" / "model.pt", seed=7)
    (tmp_path / "bad.nii.gz").write_bytes(b"\x00" * 10)
    scans = sorted(small_demo.rglob("*.nii.gz"))
    listing = tmp_path / "inputs.csv"
    listing.write_text("image\n" + "\n".join(str(p) for p in [*scans, tmp_path / "bad.nii.gz"]) + "\n")
    out = tmp_path / "out"
    _torchrun(
        "--config_file", f"['{CONFIGS / 'inference.yaml'}','{CONFIGS / 'multi_gpu_inference.yaml'}']",
        "--bundle_root", str(tmp_path),
        "--input", str(listing),
        "--output_dir", str(out),
        "--spatial_size", str(list(SMALL_SHAPE)),
        "--num_workers", "0",
        "--progress", "false",
    )
    rows = read_qc_table(out / "qc.tsv")
    assert [r["path"] for r in rows] == [str(p) for p in [*scans, tmp_path / "bad.nii.gz"]]  # input order, once each
    assert [r["status"] for r in rows] == ["ok"] * len(scans) + ["unreadable"]
    journals = {p.name: len(p.read_text().splitlines()) for p in (out / ".qc").glob("journal-rank*.jsonl")}
    assert journals == {"journal-rank0.jsonl": 5, "journal-rank1.jsonl": 4}  # inputs 0,2,4,6,8 / 1,3,5,7
    assert (out / "qc_report.html").is_file()
    # the same probabilities as one process
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update({"spatial_size": list(SMALL_SHAPE), "bundle_root": str(tmp_path)})
    single = QCJob(input=str(listing), network=parser.get_parsed_content("network_def"), output_dir=tmp_path / "single",
                   loader=parser.get_parsed_content("qc_loader"), ckpt_path=tmp_path / "models" / "model.pt",
                   num_workers=0, saliency="none", thumbnails=False, report=False, progress=False)
    single.run()
    expected = {r["path"]: r["prob_motion"] for r in read_qc_table(tmp_path / "single" / "qc.tsv")}
    for r in rows:
        if r["prob_motion"]:
            assert float(r["prob_motion"]) == pytest.approx(float(expected[r["path"]]), abs=2e-6)
        else:
            assert expected[r["path"]] == ""
    assert len(read_journal(out / ".qc")) == len(rows)
