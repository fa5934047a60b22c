"""Benchmark of batch QC (configs/inference.yaml, scripts/qc/) at full size: scans/s and peak memory.

    python tests/benchmarks/bench_inference.py [--n 12] [--repeat 3] [--raw 2] [--cores 2] [--skip-raw] [--voxel-size 1]

Rows (each run in a fresh subprocess, so memory is measured per configuration):

- ``reference``: the plain MONAI workflow of the same config (``evaluator``: LoadImaged ->
  Orientationd -> ValidateImaged -> normalisation -> Conv5FC3, DataLoader workers), which has none
  of the QC checks, journal or pictures;
- ``qc t1-linear``: the QC job on t1-linear input, with and without Grad-CAM thumbnails, each on the
  plain path (``qc#channels_last false``, ``qc#tune_allocator false``: contiguous memory, default
  allocator, as before docs/performance.md) and on the CPU fast path (the default: channels-last
  network and inputs, :func:`scripts.performance.tune_allocator`); a fast row also prints the largest
  difference of motion probability to its plain row (qc.tsv keeps 6 decimals);
- ``qc raw``: the QC job on raw synthetic heads (T1Linear preprocessing: N4 + registration).

Inputs: demo scans in t1-linear space (169x208x179, 1 mm, int16 .nii.gz; ``--voxel-size 4`` samples the
same box every 4 mm, 43x52x45, for a quick check) made by ``scripts.demo``, and synthetic raw heads
(1.2 mm, random pose) from ``scripts.preprocessing.synthetic``. Weights are
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


def _prepare(work: Path, n: int, n_raw: int, voxel_size: float) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT))
    import SimpleITK as sitk
    import torch

    from scripts.demo import make_research_demo, t1_linear_grid
    from scripts.networks import Conv5FC3
    from scripts.preprocessing.synthetic import make_head, make_scan

    t1 = work / f"t1_linear_{voxel_size:g}mm"
    if not t1.exists():
        make_research_demo(t1, n_participants=n, seed=0, voxel_size=voxel_size, two_session_fraction=0.0)
    raw = work / "raw"
    if not raw.exists() and n_raw:
        raw.mkdir()
        head = make_head()
        for i in range(n_raw):
            sitk.WriteImage(make_scan(seed=i, spacing=(1.2, 1.2, 1.2), head=head).image, str(raw / f"sub-raw{i}_T1w.nii.gz"))
    bundle = work / f"bundle_{voxel_size:g}mm"
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(Conv5FC3(input_size=t1_linear_grid(voxel_size)[0]).state_dict(), bundle / "models" / "model.pt")
    return t1, raw, bundle


def _one(args: argparse.Namespace) -> None:
    """Run one configuration in this process and print a JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch
    from monai.bundle import ConfigParser

    from scripts.demo import t1_linear_grid

    torch.set_num_threads(args.cores)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    parser.update({"bundle_root": args.bundle, "input": args.input, "output_dir": args.out, "num_workers": args.workers,
                   "batch_size": args.batch, "saliency": args.saliency, "thumbnails": args.saliency != "none",
                   "report": False, "progress": False, "datalist_key": "test",
                   "spatial_size": list(t1_linear_grid(args.voxel_size)[0]),
                   "qc#channels_last": args.fast, "qc#tune_allocator": args.fast})
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


def _max_prob_difference(out: Path, other: Path) -> float:
    """Largest difference of ``prob_motion`` between two QC runs over the same inputs (qc.tsv: 6 decimals)."""
    sys.path.insert(0, str(ROOT))
    from scripts.qc import read_qc_table

    a, b = ({r["path"]: r["prob_motion"] for r in read_qc_table(d / "qc.tsv")} for d in (out, other))
    if a.keys() != b.keys() or any((a[k] == "") != (b[k] == "") for k in a):
        return float("inf")
    return max((abs(float(a[k]) - float(b[k])) for k in a if a[k] != ""), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="t1-linear demo participants")
    ap.add_argument("--raw", type=int, default=2, help="raw synthetic scans")
    ap.add_argument("--repeat", type=int, default=3, help="times each t1-linear scan is listed")
    ap.add_argument("--cores", type=int, default=2, help="CPU cores the runs are pinned to")
    ap.add_argument("--work", default=None, help="folder for inputs (default: a temporary one)")
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--voxel-size", type=float, default=1.0,
                    help="t1-linear grid step in mm: 1 (169x208x179, default) or 4 (43x52x45, a smoke test)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for name in ("mode", "bundle", "input", "out", "saliency"):
        ap.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--fast", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _one(args)
        return
    # absolute: the repeated scans are symbolic links, which a relative --work would leave dangling
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_inference_")).resolve()
    t1_scans, raw, bundle = _prepare(work, args.n, 0 if args.skip_raw else args.raw, args.voxel_size)
    # each scan listed --repeat times (symlinks): a longer run
    t1 = work / f"t1_linear_{args.voxel_size:g}mm_x{args.repeat}"
    if not t1.exists():
        t1.mkdir()
        for k in range(args.repeat):
            for scan in sorted(t1_scans.rglob("*.nii.gz")):
                (t1 / f"r{k}_{scan.name}").symlink_to(scan)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.cores])
    import torch  # the instruction set oneDNN and ATen use here (AVX2, AVX512...): timings differ between machines

    configs = [  # mode, label, input, saliency, workers, batch, fast path
        ("reference", "MONAI evaluator, t1-linear", t1, "none", 2, 1, 0),
        ("qc", "qc t1-linear, no pictures, plain", t1, "none", 2, 1, 0),
        ("qc", "qc t1-linear, no pictures, fast", t1, "none", 2, 1, 1),
        ("qc", "qc t1-linear, no pictures, batch 2, fast", t1, "none", 2, 2, 1),
        ("qc", "qc t1-linear, Grad-CAM + thumbnails, plain", t1, "gradcam", 2, 1, 0),
        ("qc", "qc t1-linear, Grad-CAM + thumbnails, fast", t1, "gradcam", 2, 1, 1),
    ]
    if not args.skip_raw:
        configs.append(("qc", "qc raw (T1Linear), Grad-CAM + thumbnails, fast", raw, "gradcam", 2, 1, 1))
    print(f"CPU cores: {args.cores} (taskset {cpus}, {torch.backends.cpu.get_cpu_capability()}); "
          f"torch threads {args.cores}; {args.voxel_size:g} mm grid; "
          f"inputs in {work}")
    print(f"{'configuration':48s} {'scans':>5s} {'seconds':>8s} {'scans/s':>8s} {'steady/s':>8s} {'main MB':>8s} "
          f"{'worker MB':>9s} {'max |dp| vs plain':>17s}")
    outputs: dict[str, Path] = {}
    for i, (mode, label, source, saliency, workers, batch, fast) in enumerate(configs):
        out = work / f"out{i}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
        cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--one", "--mode", mode, "--bundle", str(bundle),
               "--input", str(source), "--out", str(out), "--saliency", saliency, "--workers", str(workers),
               "--batch", str(batch), "--cores", str(args.cores), "--fast", str(fast),
               "--voxel-size", str(args.voxel_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{label:48s} failed: {proc.stderr[-800:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        outputs[label] = out
        plain = outputs.get(label.replace(", fast", ", plain"))  # the same row on the plain path, if it ran
        diff = f"{_max_prob_difference(out, plain):17.1e}" if fast and plain is not None else f"{'':17s}"
        print(f"{label:48s} {r['n']:5d} {r['seconds']:8.1f} {r['n'] / r['seconds']:8.2f} {r['steady']:8.2f} "
              f"{r['main_mb']:8.0f} {r['worker_mb']:9.0f} {diff}")


if __name__ == "__main__":
    main()
