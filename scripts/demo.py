"""The embedded demo dataset, generated from the MNI ICBM152 2009 template that nilearn ships.

Nothing is downloaded: the template, grey- and white-matter maps and brain mask come from the
nilearn wheel. Each pseudo-participant is a synthetic head of :mod:`scripts.synthetic_heads` (the
generator of the shipped weights' training data): an anatomy (deformation, ventricles, atrophy,
skull, scalp, neck, eyes) fixed per participant, and per scan a T1w contrast and an acquisition
(bias, noise, resolution, ...). Research scans get research-quality acquisitions (1 mm, full field
of view); clinical scans the full range of nuisances, and motion of their grade before acquisition.

Images are written in t1-linear space (RAS, world box x -84..84, y -119..88, z -78..100 mm; at 1 mm
this is 169x208x179) as int16 NIfTI in a CAPS-like tree, with a datalist split at participant level.

A small "clinical" set adds motion of three severities (none, mild, severe) and a rater TSV with
grades 0/1/2 and straight rejects (``SR``) for scans that are not usable T1w images.

Command line: ``python -m scripts.demo <output_dir> [--clinical] [--n N] [--seed S] [--voxel-size V]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from scripts.common.files import write_json_atomic, write_nifti, write_rows_atomic
from scripts.common.grid import T1_LINEAR_EXTENT, T1_LINEAR_ORIGIN, t1_linear_grid
from scripts.datalist import split_participants
from scripts.motion.torchio_motion import torchio_motion
from scripts.synthetic_heads import (
    apply_acquisition,
    apply_bias,
    paint_head,
    render_anatomy,
    sample_acquisition_params,
    sample_anatomy_params,
    sample_contrast_params,
)

__all__ = [
    "T1_LINEAR_ORIGIN",
    "T1_LINEAR_EXTENT",
    "t1_linear_grid",
    "make_research_demo",
    "make_clinical_demo",
    "ensure_demo_dataset",
    "ensure_clinical_dataset",
    "CLINICAL_MOTION",
]

logger = logging.getLogger(__name__)

IMAGE_NAME = "{pid}_{sid}_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"

#: TorchIO RandomMotion parameters (degrees, translation mm, positions) per clinical severity grade.
CLINICAL_MOTION: dict[int, tuple[tuple[float, float], tuple[float, float], int]] = {
    1: ((1.0, 3.0), (1.0, 3.0), 4),
    2: ((5.0, 10.0), (5.0, 10.0), 8),
}
#: research scans: no thick slices, no cut field of view, little ringing
_RESEARCH_ACQUISITION = {
    "lowres_prob": 0.0,
    "fov_cut_prob": 0.0,
    "gibbs_prob": 0.1,
    "high_noise_prob": 0.0,
    "zero_background_prob": 0.0,
}


@functools.lru_cache(maxsize=2)
def _anatomy(anatomy_seed: int, voxel_size: float) -> torch.Tensor:
    """The tissue weights of a participant (cached: sessions of one participant share them)."""
    return render_anatomy(sample_anatomy_params(np.random.RandomState(anatomy_seed)), voxel_size)


def _participant_image(
    rng: np.random.RandomState, voxel_size: float, anatomy_seed: int, clinical: bool = False, grade: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One pseudo-participant scan in t1-linear space; returns (float32 volume, affine).

    ``anatomy_seed`` fixes the anatomy (the person); ``rng`` draws the scanner (contrast and
    acquisition), so two sessions of one participant share anatomy but not acquisition. A clinical
    ``grade`` of 1 or 2 moves the head (:data:`CLINICAL_MOTION`, TorchIO) before the acquisition.
    """
    _, affine = t1_linear_grid(voxel_size)
    contrast = sample_contrast_params(rng)
    acquisition = sample_acquisition_params(rng, None if clinical else _RESEARCH_ACQUISITION)
    obj, head = paint_head(_anatomy(anatomy_seed, float(voxel_size)), contrast)
    obj = apply_bias(obj, acquisition)
    if grade > 0:
        degrees, translation, nt = CLINICAL_MOTION[grade]
        moved = torchio_motion(
            MetaTensor(obj[None], affine=torch.as_tensor(affine)),
            degrees,
            translation,
            nt,
            seed=int(rng.randint(0, 2**31 - 1)),
        )
        obj = torch.as_tensor(moved)[0].abs()
    return apply_acquisition(obj, head, acquisition, voxel_size).numpy(), affine


def _scans(
    rng: np.random.RandomState, prefix: str, n: int, two_session_fraction: float
) -> Iterator[tuple[str, str, int, np.random.RandomState, Path]]:
    """The scans of a demo set: ``(participant_id, session_id, anatomy_seed, scan_rng, relative_path)``.

    Draws from ``rng`` lazily, so a caller that also draws from ``rng`` between scans stays deterministic.
    A participant keeps one anatomy seed over its sessions; each scan gets its own generator.
    """
    sessions = [["ses-M000", "ses-M024"] if rng.uniform() < two_session_fraction else ["ses-M000"] for _ in range(n)]
    for p, sess in enumerate(sessions):
        pid = f"sub-{prefix}{p + 1:03d}"
        anatomy_seed = int(rng.randint(0, 2**31 - 1))
        for sid in sess:
            scan_rng = np.random.RandomState(rng.randint(0, 2**31 - 1))
            yield pid, sid, anatomy_seed, scan_rng, Path(pid) / sid / "t1_linear" / IMAGE_NAME.format(pid=pid, sid=sid)


def make_research_demo(
    output_dir: str | os.PathLike,
    n_participants: int = 24,
    seed: int = 0,
    voxel_size: float = 1.0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    two_session_fraction: float = 0.25,
) -> Path:
    """Write motion-free "research" scans and ``datalist.json`` into ``output_dir``; return the datalist path.

    Every item is ``{"image", "label": 0, "participant_id", "session_id"}`` with the image path
    relative to ``output_dir``. Deterministic for a given seed, voxel size and participant count.
    """
    out = Path(output_dir)
    rng = np.random.RandomState(seed)
    items = []
    for pid, sid, anatomy_seed, scan_rng, rel in _scans(rng, "R", n_participants, two_session_fraction):
        volume, affine = _participant_image(scan_rng, voxel_size, anatomy_seed)
        write_nifti(volume, affine, out / rel)
        items.append({"image": str(rel), "label": 0, "participant_id": pid, "session_id": sid})
        logger.info("demo: wrote %s", rel)
    datalist = split_participants(items, fractions, seed=seed)
    return write_json_atomic(datalist, out / "datalist.json")


def _rater_grade(rng: np.random.RandomState, grade: int, agreement: float) -> int:
    """A rater's grade: the true grade with probability ``agreement``, otherwise a neighbouring grade."""
    if rng.uniform() < agreement:
        return grade
    return int(np.clip(grade + rng.choice([-1, 1]), 0, 2))


def make_clinical_demo(
    output_dir: str | os.PathLike,
    n_participants: int = 30,
    seed: int = 1,
    voxel_size: float = 1.0,
    grade_probs: Sequence[float] = (0.5, 0.3, 0.2),
    reject_fraction: float = 0.07,
    agreement: float = 0.85,
) -> Path:
    """Write "clinical" scans with motion of several severities and ``ratings.tsv``; return the TSV path.

    The true grade g (0 none, 1 mild, 2 severe) of each scan sets its TorchIO motion
    (:data:`CLINICAL_MOTION`). Two raters grade it, each agreeing with g with probability
    ``agreement``; about ``reject_fraction`` of the scans are not usable T1w images (inverted
    contrast) and are marked ``SR`` by both raters. One in ten second ratings is left empty. The TSV
    columns are ``participant_id, session_id, image, rater_1, rater_2, true_grade``.
    """
    out = Path(output_dir)
    rng = np.random.RandomState(seed)
    rows: list[dict[str, Any]] = []
    for pid, sid, anatomy_seed, scan_rng, rel in _scans(rng, "C", n_participants, 0.2):
        grade = int(rng.choice(3, p=grade_probs))
        reject = rng.uniform() < reject_fraction
        volume, affine = _participant_image(scan_rng, voxel_size, anatomy_seed, clinical=True, grade=grade)
        if reject:  # not a T1w: inverted contrast inside the head
            volume = np.where(volume > 0.05 * volume.max(), volume.max() - volume, volume)
        write_nifti(volume, affine, out / rel)
        if reject:
            r1, r2 = "SR", "SR"
        else:
            r1 = str(_rater_grade(rng, grade, agreement))
            r2 = "" if rng.uniform() < 0.1 else str(_rater_grade(rng, grade, agreement))
        rows.append(
            {
                "participant_id": pid,
                "session_id": sid,
                "image": str(rel),
                "rater_1": r1,
                "rater_2": r2,
                "true_grade": grade,
            }
        )
        logger.info("clinical demo: wrote %s (grade %d%s)", rel, grade, ", straight reject" if reject else "")
    return write_rows_atomic(rows, out / "ratings.tsv", list(rows[0]), delimiter="\t", extrasaction="raise")


def _generate_once(root: Path, product: str, what: str, generate: Callable[[Path], Path]) -> Path:
    """Return ``root / product``, calling ``generate(root)`` first when ``root`` is missing or empty.

    A folder that already holds ``product`` is used as it is (that is how ``dataset_dir`` points at
    your own data). A non-empty folder without it is an error rather than a place to write demo
    files into. A ``.generating`` marker makes an interrupted generation start again on the next call.
    """
    target = root / product
    if target.is_file():
        return target
    marker = root / ".generating"
    if root.exists() and any(p.name != marker.name for p in root.iterdir()):
        if not marker.exists():
            raise FileNotFoundError(
                f"dataset_dir {root} has no {product}; write one (see README, 'Your own data') "
                "or point dataset_dir at an empty or missing folder to generate the demo dataset there."
            )
        shutil.rmtree(root)  # an interrupted generation: start again
    root.mkdir(parents=True, exist_ok=True)
    marker.touch()
    logger.info("generating the %s in %s", what, root)
    path = generate(root)
    marker.unlink()
    return path


def ensure_demo_dataset(
    dataset_dir: str | os.PathLike, n_participants: int = 24, seed: int = 0, voxel_size: float = 1.0
) -> Path:
    """Return ``<dataset_dir>/datalist.json``, generating the research demo there when the folder is empty."""
    return _generate_once(
        Path(dataset_dir),
        "datalist.json",
        f"research demo dataset ({n_participants} participants, {voxel_size:g} mm)",
        lambda root: make_research_demo(root, n_participants=n_participants, seed=seed, voxel_size=voxel_size),
    )


def ensure_clinical_dataset(
    dataset_dir: str | os.PathLike, n_participants: int = 30, seed: int = 1, voxel_size: float = 1.0
) -> Path:
    """Return ``<dataset_dir>/ratings.tsv``, generating the clinical demo there when the folder is empty.

    A folder with a ``ratings.tsv`` (columns participant_id, session_id, image, rater_1, ...) is your
    own clinical data and is used as it is.
    """
    return _generate_once(
        Path(dataset_dir),
        "ratings.tsv",
        f"clinical demo dataset ({n_participants} participants, {voxel_size:g} mm)",
        lambda root: make_clinical_demo(root, n_participants=n_participants, seed=seed, voxel_size=voxel_size),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the embedded demo dataset.")
    parser.add_argument("output_dir")
    parser.add_argument("--clinical", action="store_true", help="write the clinical set (motion + ratings)")
    parser.add_argument("--n", type=int, default=None, help="number of participants")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--voxel-size", type=float, default=1.0, help="mm; 1 gives 169x208x179")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.clinical:
        path = make_clinical_demo(args.output_dir, args.n or 30, 1 if args.seed is None else args.seed, args.voxel_size)
    else:
        path = make_research_demo(args.output_dir, args.n or 24, args.seed or 0, args.voxel_size)
    print(path)


if __name__ == "__main__":
    main()
