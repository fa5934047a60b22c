"""Calibration of the "is this a T1w brain in t1-linear space?" gate (QC ``not_brain``, preprocessing
``registration_diverged``) on synthetic heads and non-brains, against the gate it replaced.

Brains: domain-randomised synthetic heads (:mod:`scripts.synthetic_heads`; training, held-out anatomy
and held-out contrast regimes), clean, moved by each motion simulator (image-based, k-space, TorchIO)
at maximal rotations/translations of 0.5-16 deg/mm, and clean with each acquisition nuisance alone at
its strongest. Non-brains: every kind of :data:`scripts.synthetic_heads.NON_BRAINS` made from the same
heads. For each image the gate's evidence (:func:`scripts.preprocessing.quality.brain_evidence`) and
verdict are recorded, and so is the old gate's (voxel-wise correlation with the template under 0.4).

Usage::

    python tests/benchmarks/bench_gates.py [--voxel 1.0] [--anatomies 4] [--json runs/gates/gates.json]

Prints one row per group: images, smoothed correlation (min / median), refused and doubtful by the
gate, refused by the old gate. A brain refused, or a non-brain accepted, is a gate error.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

SEVERITIES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SIMULATORS = ("image", "kspace", "torchio")
REGIMES = ("train", "anatomy_heldout", "contrast_heldout")


def old_gate_correlation(array: np.ndarray) -> float:
    """The replaced measure: voxel-wise Pearson correlation with the template inside its brain mask."""
    from scripts.preprocessing.quality import template_similarity

    return template_similarity(array, sigma_mm=0.0)


def calibration_images(voxel: float, anatomies: int, seed: int = 0):
    """Yield ``(group, kind, image)`` for the calibration set (see the module docstring)."""
    from scripts import synthetic_heads as sh
    from scripts.common.grid import t1_linear_grid

    _, affine = t1_linear_grid(voxel)
    for a in range(anatomies):
        regime = REGIMES[a % len(REGIMES)]
        gen = sh.SyntheticHeadPaird(voxel_size=voxel, regime=regime, anatomy_reuse=10**6)
        gen.set_random_state(seed + a)
        gen.randomize()
        clean, moved = gen.render(moved=True)  # renders the anatomy once
        yield "brain: clean", regime, clean.numpy()
        obj, head = sh.paint_head(gen._weights, gen.contrast)
        obj = sh.apply_bias(obj, gen.acq)
        rng = np.random.RandomState(seed + 1000 + a)
        for simulator in SIMULATORS:
            for severity in SEVERITIES:
                params = sh.sample_motion_params(rng, [simulator], (severity, severity))
                img = sh.apply_acquisition(sh.apply_motion(obj, affine, params, "auto"), head, gen.acq, voxel)
                yield f"brain: moved {severity:g}", simulator, img.numpy()
        for nuisance, overrides in sh.NUISANCES.items():
            if nuisance == "none":
                continue
            acq = sh.sample_acquisition_params(rng, overrides, base="none")
            img = sh.apply_acquisition(
                sh.apply_bias(sh.paint_head(gen._weights, gen.contrast)[0], acq), head, acq, voxel
            )
            yield f"brain: {nuisance}", nuisance, img.numpy()
        for kind in sh.NON_BRAINS:
            yield f"non-brain: {kind}", kind, sh.make_non_brain(kind, clean, seed + a)


def main() -> None:
    from scripts.preprocessing.quality import BrainGate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxel", type=float, default=1.0, help="grid voxel (mm); 1 is the real size")
    parser.add_argument("--anatomies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refuse_below", type=float, default=BrainGate.refuse_below)
    parser.add_argument("--doubt_below", type=float, default=BrainGate.doubt_below)
    parser.add_argument("--old_threshold", type=float, default=0.4)
    parser.add_argument("--json", default="", help="also write every measured image here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gate = BrainGate(refuse_below=args.refuse_below, doubt_below=args.doubt_below)

    records = []
    start = time.perf_counter()
    for group, kind, image in calibration_images(args.voxel, args.anatomies, args.seed):
        verdict, reason, ev = gate.check(image)
        old = old_gate_correlation(image)
        records.append(
            {
                "group": group,
                "kind": kind,
                "similarity": ev.similarity,
                "flipped_similarity": ev.flipped_similarity,
                "distinct_values": ev.distinct_values,
                "verdict": verdict,
                "reason": reason,
                "old_correlation": old,
                "old_refused": bool(old < args.old_threshold),
            }
        )
    seconds = time.perf_counter() - start

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["group"]].append(r)
    header = f"{'group':<26} {'n':>3} {'sim min':>8} {'sim med':>8} {'refused':>8} {'doubtful':>8} {'old ref.':>8}"
    print(
        f"gate: refuse < {gate.refuse_below:g}, doubtful < {gate.doubt_below:g}, sigma {gate.sigma_mm:g} mm, "
        f"label maps <= {gate.max_label_values} values; old gate: voxel-wise correlation < {args.old_threshold:g}"
    )
    print(f"voxel {args.voxel:g} mm, {args.anatomies} anatomies, {len(records)} images, {seconds:.0f} s\n")
    print(header)
    print("-" * len(header))
    errors = {"brains refused": 0, "brains": 0, "non-brains accepted": 0, "non-brains": 0, "old errors": 0}
    for group in sorted(groups, key=lambda g: (g.startswith("non"), g)):
        rows = groups[group]
        sims = np.array([r["similarity"] for r in rows])
        refused = sum(r["verdict"] == "not_brain" for r in rows)
        doubtful = sum(r["verdict"] == "doubtful" for r in rows)
        old = sum(r["old_refused"] for r in rows)
        print(
            f"{group:<26} {len(rows):>3} {sims.min():>8.3f} {np.median(sims):>8.3f} {refused:>8} {doubtful:>8} {old:>8}"
        )
        if group.startswith("brain"):
            errors["brains"] += len(rows)
            errors["brains refused"] += refused
            errors["old errors"] += old
        else:
            errors["non-brains"] += len(rows)
            errors["non-brains accepted"] += len(rows) - refused
            errors["old errors"] += len(rows) - old
    print(
        f"\nbrains refused: {errors['brains refused']}/{errors['brains']}; "
        f"non-brains accepted: {errors['non-brains accepted']}/{errors['non-brains']}; "
        f"old gate errors (brains refused + non-brains accepted): {errors['old errors']}/{len(records)}"
    )
    brains = [r for r in records if r["group"].startswith("brain")]
    non = [r for r in records if not r["group"].startswith("brain")]
    by_level = [r["similarity"] for r in non if r["kind"] not in ("label_map", "sparse", "upside_down")]
    print(
        f"margins: lowest brain similarity {min(r['similarity'] for r in brains):.3f}, highest non-brain similarity "
        f"(kinds refused by level) {max(by_level, default=float('nan')):.3f}; largest brain "
        f"flipped-minus-plain similarity {max(r['flipped_similarity'] - r['similarity'] for r in brains):.3f} (< 0)"
    )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "seconds": seconds, "records": records}, indent=1))


if __name__ == "__main__":
    main()
