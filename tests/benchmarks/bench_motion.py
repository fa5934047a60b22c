"""Benchmark of the motion simulators on a 169x208x179 t1-linear-like brain (not collected by pytest).

Prints one table: TorchIO ``RandomMotion`` (reference, Nt = 4), ours image-based (Nt = 4), ours
k-space time course (nT = 200, default K), CPU seconds per volume with 2 threads, and volumes/s
batched through ``MotionPrepareBatch`` on a GPU when one is present.

Usage: ``python tests/benchmarks/bench_motion.py [--repeats 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the bundle root, for `scripts`


def t1_linear_like_brain() -> tuple[torch.Tensor, torch.Tensor]:
    """MNI152 2009 template (nilearn, shipped with the package) resampled into the t1-linear box.

    Returns ``(1, 169, 208, 179)`` float32 (intensities scaled to 0..1000) and its RAS affine.
    """
    from nilearn import datasets, image

    tpl = datasets.load_mni152_template(resolution=1)
    affine = np.eye(4)
    affine[:3, 3] = (-84.0, -119.0, -78.0)
    res = image.resample_img(tpl, target_affine=affine, target_shape=(169, 208, 179), interpolation="continuous",
                             force_resample=True, copy_header=True)
    data = np.clip(res.get_fdata(dtype=np.float32), 0, None) * 1000.0
    return torch.from_numpy(data)[None], torch.from_numpy(affine)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-batch", type=int, default=16)
    parser.add_argument("--resampler", default="auto", help="CPU resampling: auto (compiled) | grid_sample | compiled")
    parser.add_argument("--layout", choices=("loaded", "C"), default="loaded",
                        help="memory order of the volume: as nibabel loads it (Fortran) or C-contiguous")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import SimpleITK as sitk
    import torchio as tio

    from scripts.motion import DEFAULT_N_SEGMENTS, MotionPrepareBatch, RandImageMotion, RandKSpaceMotion

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    img, affine = t1_linear_like_brain()
    if args.layout == "C":
        img = img.contiguous()
    print(f"volume {tuple(img.shape[1:])} ({'C' if img.is_contiguous() else 'Fortran'} order), {args.threads} CPU "
          f"threads, median of {args.repeats} runs, resampling resampler {args.resampler}")
    rows = []

    subject = tio.Subject(image=tio.ScalarImage(tensor=img, affine=affine.numpy()))
    ref = tio.RandomMotion(degrees=(2, 8), translation=(2, 8), num_transforms=4)
    t_ref = timed(lambda: ref(subject), args.repeats)
    rows.append(("TorchIO RandomMotion, Nt=4", t_ref))

    from monai.data import MetaTensor

    meta = MetaTensor(img, affine=affine)
    ours_img = RandImageMotion(prob=1.0, degrees=(2, 8), translation=(2, 8), num_transforms=4, resampler=args.resampler)
    ours_img.set_random_state(0)
    t_img = timed(lambda: ours_img(meta), args.repeats)
    rows.append(("ours image-based, Nt=4", t_img))

    ours_k = RandKSpaceMotion(prob=1.0, n_t=200, resampler=args.resampler)
    ours_k.set_random_state(0)
    t_k = timed(lambda: ours_k(meta), args.repeats)
    rows.append((f"ours k-space, nT=200, K={DEFAULT_N_SEGMENTS}", t_k))

    print(f"{'method':38s} {'CPU s/volume':>12s} {'vs TorchIO':>10s} {'GPU volumes/s':>14s}")
    gpu = torch.cuda.is_available()
    for name, sec in rows:
        gpu_col = "no GPU"
        if gpu and not name.startswith("TorchIO"):
            method = "image" if "image" in name else "kspace"
            kw = {"degrees": (2, 8), "translation": (2, 8), "num_transforms": 4} if method == "image" else {}
            prep = MotionPrepareBatch(method, prob=1.0, seed=0, **kw)
            batch = {"image": MetaTensor(img.repeat(args.gpu_batch, 1, 1, 1, 1), affine=affine),
                     "label": torch.zeros(args.gpu_batch, dtype=torch.long)}
            dev = torch.device("cuda")

            def run() -> None:
                prep(batch, dev)
                torch.cuda.synchronize()

            gpu_col = f"{args.gpu_batch / timed(run, max(2, args.repeats // 2)):.1f}"
        elif name.startswith("TorchIO"):
            gpu_col = "-"
        print(f"{name:38s} {sec:12.3f} {t_ref / sec:9.1f}x {gpu_col:>14s}")


if __name__ == "__main__":
    main()
