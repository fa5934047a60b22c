"""Make docs/figures/synthetic_heads.png: clean/moved pairs of synthetic heads (the shipped weights' data).

Usage (from the bundle root): ``python docs/make_synthetic_heads_figure.py [--n 4] [--seed 3]``.
Each row is one draw of ``scripts.synthetic_heads.SyntheticHeadPaird``: sagittal, coronal and axial
central slices of the clean image, then the same slices of the moved image (same acquisition).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures" / "synthetic_heads.png"))
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    from scripts.synthetic_heads import SyntheticHeadPaird

    gen = SyntheticHeadPaird(simulators=["image", "kspace"], simulator_weights=[0.75, 0.25])
    gen.set_random_state(seed=args.seed)
    fig, axes = plt.subplots(args.n, 6, figsize=(12, 2.2 * args.n), squeeze=False)
    for row in range(args.n):
        d = gen({})
        m = gen.motion
        for k, vol in enumerate(np.asarray(d["image"])):
            c = [s // 2 for s in vol.shape]
            vmax = np.percentile(vol, 99.5)
            for j, sl in enumerate((vol[c[0]], vol[:, c[1]], vol[:, :, c[2]])):
                ax = axes[row, 3 * k + j]
                ax.imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=vmax)
                ax.axis("off")
        axes[row, 0].set_title("clean", fontsize=8, loc="left")
        axes[row, 3].set_title(f"moved: {m['simulator']}, {m['level']:.1f} deg/mm, axis {m['phase_axis']}",
                               fontsize=8, loc="left")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(args.out)


if __name__ == "__main__":
    main()
