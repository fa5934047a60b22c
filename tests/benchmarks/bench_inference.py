"""Benchmark of batch QC (configs/inference.yaml, scripts/qc.py) at full size: scans/s and peak memory.

    python tests/benchmarks/bench_inference.py [--n 12] [--repeat 3] [--raw 2] [--cores 2] [--skip-raw]

Rows (each run in a fresh subprocess, so memory is measured per configuration):

- ``reference``: the plain MONAI workflow of the same config (``evaluator``: LoadImaged ->
  Orientationd -> ValidateImaged -> normalisation -> Conv5FC3, DataLoader workers), which has none
  of the QC checks, journal or pictures;
- ``qc t1-linear``: the QC job on t1-linear input, with and without Grad-CAM thumbnails;
- ``qc raw``: the QC job on raw synthetic heads (T1Linear preprocessing: N4 + registration).

Inputs: demo scans in t1-linear space (169x208x179, 1 mm, int16 .nii.gz) made by ``scripts.demo``,
and synthetic raw heads (1.2 mm, random pose) from ``scripts.preprocessing.synthetic``. Weights are
a freshly initialised Conv5FC3 (speed does not depend on the values). ``scans/s`` is over the whole
job run (weights hashing and loading, template, worker pool start, report skipped) without the
process start (imports, config parsing); ``steady/s`` is between the first and the last recorded
scan (what matters for a long batch). Peak memory is the
peak resident set size of the main process and of the largest worker process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _prepare(work: Path, n: int, n_raw: int) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT))
    import SimpleITK as sitk
    import torch

    from scripts.demo import make_research_demo
    from scripts.networks import Conv5FC3
    from scripts.preprocessing.synthetic import make_head, make_scan

    t1 = work / "t1_linear"
    if not t1.exists():
        make_research_demo(t1, n_participants=n, seed=0, voxel_size=1.0, two_session_fraction=0.0)
    raw = work / "raw"
    if not raw.exists() and n_raw:
        raw.mkdir()
        head = make_head()
        for i in range(n_raw):
            sitk.WriteImage(make_scan(seed=i, spacing=(1.2, 1.2, 1.2), head=head).image, str(raw / f"sub-raw{i}_T1w.nii.gz"))
    bundle = work / "bundle"
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(Conv5FC3().state_dict(), bundle / "models" / "model.pt")
    return t1, raw, bundle


def _one(args: argparse.Namespace) -> None:
    """Run one configuration in this process and print a JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch
    from monai.bundle import ConfigParser

    torch.set_num_threads(args.cores)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    parser.update({"bundle_root": args.bundle, "input": args.input, "output_dir": args.out, "num_workers": args.workers,
                   "batch_size": args.batch, "saliency": args.saliency, "thumbnails": args.saliency != "none",
                   "report": False, "progress": False, "datalist_key": "test"})
    n = 0
    start = time.perf_counter()
    if args.mode == "reference":
        from scripts.datalist import resolve_inputs

        parser["dataset"]["data"] = resolve_inputs(args.input)
        evaluator = parser.get_parsed_content("evaluator")
        n = len(parser.get_parsed_content("dataset"))
        start = time.perf_counter()
        evaluator.run()
    else:
        job = parser.get_parsed_content("qc")
        start = time.perf_counter()
        counts = job.run()
        n = sum(counts.values())
        assert counts.get("ok", 0) + counts.get("warning", 0) == n, counts
    seconds = time.perf_counter() - start
    steady = float("nan")
    if args.mode != "reference":
        from scripts.qc import read_journal

        stamps = sorted(r["recorded_at"] for r in read_journal(Path(args.out) / ".qc").values())
        if len(stamps) > 2:  # scans/s between the first and the last recorded scan: no start-up
            steady = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"n": n, "seconds": seconds, "steady": steady, "main_mb": main_mb, "worker_mb": child_mb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="t1-linear demo participants")
    ap.add_argument("--raw", type=int, default=2, help="raw synthetic scans")
    ap.add_argument("--repeat", type=int, default=3, help="times each t1-linear scan is listed")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores the runs are pinned to")
    ap.add_argument("--work", default=None, help="folder for inputs (default: a temporary one)")
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for name in ("mode", "bundle", "input", "out", "saliency"):
        ap.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _one(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_inference_"))
    t1_scans, raw, bundle = _prepare(work, args.n, 0 if args.skip_raw else args.raw)
    t1 = work / f"t1_linear_x{args.repeat}"  # each scan listed --repeat times (symlinks): a longer run
    if not t1.exists():
        t1.mkdir()
        for k in range(args.repeat):
            for scan in sorted(t1_scans.rglob("*.nii.gz")):
                (t1 / f"r{k}_{scan.name}").symlink_to(scan)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.cores])
    configs = [
        ("reference", "MONAI evaluator, t1-linear", t1, "none", 2, 1),
        ("qc", "qc t1-linear, no pictures", t1, "none", 2, 1),
        ("qc", "qc t1-linear, no pictures, batch 2", t1, "none", 2, 2),
        ("qc", "qc t1-linear, Grad-CAM + thumbnails", t1, "gradcam", 2, 1),
    ]
    if not args.skip_raw:
        configs.append(("qc", "qc raw (T1Linear), Grad-CAM + thumbnails", raw, "gradcam", 2, 1))
    print(f"CPU cores: {args.cores} (taskset {cpus}); torch threads {args.cores}; inputs in {work}")
    print(f"{'configuration':45s} {'scans':>5s} {'seconds':>8s} {'scans/s':>8s} {'steady/s':>8s} {'main MB':>8s} {'worker MB':>9s}")
    for i, (mode, label, source, saliency, workers, batch) in enumerate(configs):
        out = work / f"out{i}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
        cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--one", "--mode", mode, "--bundle", str(bundle),
               "--input", str(source), "--out", str(out), "--saliency", saliency, "--workers", str(workers),
               "--batch", str(batch), "--cores", str(args.cores)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{label:45s} failed: {proc.stderr[-800:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{label:45s} {r['n']:5d} {r['seconds']:8.1f} {r['n'] / r['seconds']:8.2f} {r['steady']:8.2f} "
              f"{r['main_mb']:8.0f} {r['worker_mb']:9.0f}")


if __name__ == "__main__":
    main()
