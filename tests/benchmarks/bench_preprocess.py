"""Benchmark of t1-linear preprocessing: time per step, peak memory and accuracy per scan.

Synthetic heads (nilearn's template + skull, scalp, neck) are moved by random affines (up to
15 deg, 20 mm, +-10 %), given a bias field and noise, and written as NIfTI on LPS grids of
several voxel sizes. Each scan is preprocessed in a fresh process (so its peak memory is its own)
with a fixed number of ITK threads.

With ``--reference`` the first scan is also run with an ANTs/Clinica-like schedule implemented
with the same ITK code (N4 run to the full 4x50 iterations, 25 % metric sampling with no cap);
ANTs itself is not installed here, so this is the nearest
reference available in the same run. (Both use this package's pyramid, so the difference shows
what the N4 convergence threshold and the sample cap save.)

Usage::

    python tests/benchmarks/bench_preprocess.py [--threads 2] [--scans 3] [--reference]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPACINGS = [(1.0, 1.0, 1.5), (1.0, 1.0, 1.0), (0.5, 0.5, 1.2), (1.2, 1.0, 1.0)]
REFERENCE = {"n4_convergence": 0.0, "sampling_fraction": 0.25, "max_samples": 10**9}


def _child(path: str, threads: int, settings: dict, queue: mp.Queue) -> None:
    import SimpleITK as sitk

    from scripts.preprocessing import PreprocessingError, preprocess_t1_linear

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    cpu = time.process_time()
    try:
        _, result = preprocess_t1_linear(path, settings)
        out = result.to_dict()
    except PreprocessingError as err:
        out = {"status": err.code, "reason": err.reason, "step_seconds": {}, "seconds": float("nan")}
    out["cpu"] = time.process_time() - cpu
    out["peak_mb"] = _peak_rss_mb()
    queue.put(out)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the pre-exec parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(path: Path, threads: int, settings: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(path), threads, settings, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="ITK threads per scan (default 2)")
    parser.add_argument("--scans", type=int, default=3, help="number of synthetic scans (default 3)")
    parser.add_argument("--reference", action="store_true", help="also run an ANTs-like schedule on scan 0")
    parser.add_argument(
        "--realistic", action="store_true",
        help="also the hard heads of issue 13: strong bias (x0.45-x2.2), neck and shoulders, tilted 40 deg",
    )
    args = parser.parse_args()

    import SimpleITK as sitk

    from scripts.preprocessing.core import ras_matrix
    from scripts.preprocessing.io import ras_affine
    from scripts.preprocessing.synthetic import affine_from_parameters, make_head, make_scan

    head = make_head()
    mask = head[1]
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::40][:, ::-1]
    affine = ras_affine(mask)
    brain_ras = np.c_[idx, np.ones(len(idx))] @ affine.T  # (n, 4) template RAS points

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i in range(args.scans):
            spacing = SPACINGS[i % len(SPACINGS)]
            scan = make_scan(seed=100 + i, spacing=spacing, head=head)
            path = Path(tmp) / f"scan{i}.nii.gz"
            sitk.WriteImage(scan.image, str(path))
            truth = ras_matrix(scan.transform)
            jobs.append((f"scan{i} {'x'.join(f'{s:g}' for s in spacing)}mm", path, truth, {}, scan.image.GetSize()))
            if i == 0 and args.reference:
                jobs.append((f"scan{i} ANTs-like schedule", path, truth, REFERENCE, scan.image.GetSize()))
        if args.realistic:
            hard = {
                "strong bias 1x1x1.2mm": dict(seed=6, spacing=(1.0, 1.0, 1.2), head=head, bias_strength=0.8),
                "neck+shoulders 1mm": dict(seed=5, spacing=(1.0, 1.0, 1.0), head=make_head(-200.0, shoulders=True)),
                "tilted 40deg 1mm": dict(
                    seed=2, spacing=(1.0, 1.0, 1.0), head=head,
                    transform=affine_from_parameters((-40.0, 10.0, 0.0), (5.0, -8.0, 6.0), (1.0, 1.0, 1.0)),
                ),
            }
            for name, kwargs in hard.items():
                scan = make_scan(**kwargs)
                path = Path(tmp) / f"{name.split()[0]}.nii.gz"
                sitk.WriteImage(scan.image, str(path))
                jobs.append((name, path, ras_matrix(scan.transform), {}, scan.image.GetSize()))
        for name, path, truth, settings, size in jobs:
            start = time.perf_counter()
            out = _run(path, args.threads, settings)
            wall = time.perf_counter() - start
            err = float("nan")
            if out.get("matrix") is not None:
                est = np.asarray(out["matrix"])
                err = float(np.linalg.norm((brain_ras @ est.T - brain_ras @ truth.T)[:, :3], axis=1).mean())
            steps = out["step_seconds"]
            rows.append(
                [name, "x".join(str(s) for s in size), *(steps.get(k, float("nan")) for k in ("read", "n4", "register", "resample", "quality")),
                 out["seconds"], out["cpu"], wall, out["peak_mb"], err, out.get("correlation", float("nan")), out.get("status", "ok")]
            )
    header = ["scan", "voxels", "read s", "n4 s", "register s", "resample s", "quality s", "total s", "cpu s",
              "process wall s", "peak RSS MB", "disp err mm", "corr", "status"]
    widths = [max(len(h), 12) for h in header]
    widths[0] = max(len(r[0]) for r in rows) + 1
    print(f"t1-linear preprocessing, {args.threads} ITK thread(s). Steps and total: wall seconds inside the call; "
          "cpu: CPU seconds of all threads (cpu / total < threads means the CPU was shared); "
          "process wall adds Python start-up and imports")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    ok = [r for r in rows if r[0].startswith("scan") and "ANTs" not in r[0]]
    print(f"mean total per scan (default settings, typical heads): {np.mean([r[7] for r in ok]):.2f} s; "
          f"max peak RSS {max(r[10] for r in ok):.0f} MB")
    hard_rows = [r for r in rows if not r[0].startswith("scan")]
    if hard_rows:
        print(f"hard heads: mean total {np.mean([r[7] for r in hard_rows]):.2f} s, "
              f"max displacement error {max(r[11] for r in hard_rows):.2f} mm")


if __name__ == "__main__":
    main()
