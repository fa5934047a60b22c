"""Make docs/figures/motion_examples.png: a clean slice and both simulators at three severities.

Usage (from the bundle root): ``python docs/make_motion_figure.py [--out docs/figures/motion_examples.png]``.
The brain is the MNI152 2009 template shipped with nilearn, resampled into the t1-linear box.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures" / "motion_examples.png"))
    args = parser.parse_args()
    from bench_motion import t1_linear_like_brain
    from monai.data import MetaTensor

    from scripts.motion import RandImageMotion, RandKSpaceMotion

    img, affine = t1_linear_like_brain()
    meta = MetaTensor(img, affine=affine)
    severities = ("mild", "moderate", "severe")
    rows = {"image-based": RandImageMotion, "k-space time course": RandKSpaceMotion}
    sl = img.shape[3] // 2 + 10  # an axial slice through the ventricles
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.4))
    vmax = float(img.max())
    for r, (name, cls) in enumerate(rows.items()):
        axes[r, 0].imshow(img[0, :, :, sl].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        axes[r, 0].set_title("clean")
        for c, sev in enumerate(severities, start=1):
            t = cls(prob=1.0, severity=sev)
            t.set_random_state(c)
            out = torch.as_tensor(t(meta))
            axes[r, c].imshow(out[0, :, :, sl].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            axes[r, c].set_title(f"{name}: {sev}")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
