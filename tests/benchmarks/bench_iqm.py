"""Benchmark of scripts.iqm.volume_iqms on a t1-linear-sized volume (169 x 208 x 179), one core.

Compares the vectorised implementation with the literal per-slice scikit-image reference
(``volume_iqms_reference``) in the same run and prints per-volume wall and CPU time and the largest
relative difference between the two over the 15 IQMs.

    python tests/benchmarks/bench_iqm.py [--repeats 3] [--mrqy-compatible]

The volume is the MNI152 2009 template shipped with nilearn, placed in the t1-linear box, scaled to
raw-like intensities (x 1000) with Rician noise (sigma 20), so the background is not empty.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, before numpy is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from scripts.iqm import IQM_NAMES, volume_iqms, volume_iqms_reference  # noqa: E402


def t1_linear_like_volume(seed: int = 0) -> np.ndarray:
    """MNI template (197x233x189, origin -98,-134,-72) cut into the t1-linear box + Rician noise."""
    from nilearn.datasets import load_mni152_template

    tpl = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    vol = np.zeros((169, 208, 179), np.float32)
    # t1-linear x -84..84 -> template index 14..182; y -119..88 -> 15..222; z -78..100 -> -6..172
    vol[:, :, 6:] = tpl[14:183, 15:223, 0:173]
    rng = np.random.default_rng(seed)
    vol *= 1000.0
    noisy = np.sqrt((vol + rng.normal(0, 20, vol.shape)) ** 2 + rng.normal(0, 20, vol.shape) ** 2)
    return noisy.astype(np.float32)


def _time(fn, repeats: int) -> tuple[float, float, dict]:
    walls, cpus, out = [], [], {}
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mrqy-compatible", action="store_true")
    args = ap.parse_args()
    vol = t1_linear_like_volume()
    compat = args.mrqy_compatible
    wall_f, cpu_f, fast = _time(lambda: volume_iqms(vol, mrqy_compatible=compat), args.repeats)
    wall_r, cpu_r, ref = _time(lambda: volume_iqms_reference(vol, mrqy_compatible=compat), max(1, args.repeats // 2))
    rel = {k: abs(fast[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in IQM_NAMES}
    worst = max(rel, key=rel.get)
    print(f"volume {vol.shape}, {vol.shape[2] - 1} slices, mrqy_compatible={compat}, load {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':<38} {'wall s/vol':>10} {'CPU s/vol':>10} {'speed-up':>9}")
    print(f"{'scripts.iqm.volume_iqms (vectorised)':<38} {wall_f:>10.2f} {cpu_f:>10.2f} {cpu_r / cpu_f:>8.1f}x")
    print(f"{'volume_iqms_reference (skimage loop)':<38} {wall_r:>10.2f} {cpu_r:>10.2f} {1.0:>8.1f}x")
    print(f"largest relative difference: {rel[worst]:.2e} ({worst}); target <= 2 s per volume on one core")
    print("IQM      vectorised        reference")
    for k in IQM_NAMES:
        print(f"{k:<6} {fast[k]:>12.6g} {ref[k]:>16.6g}")


if __name__ == "__main__":
    main()
