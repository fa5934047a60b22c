"""Batch t1-linear preprocessing of a folder or BIDS dataset into a CAPS-like tree.

Outputs, per scan (``<prefix>`` = ``sub-X_ses-Y`` plus any other BIDS entities of the input)::

    <output_dir>/subjects/sub-X/ses-Y/t1_linear/
        <prefix>_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz   the t1-linear image
        <prefix>_space-MNI152NLin2009cSym_res-1x1x1_affine.mat              template -> scan (ITK)
        <prefix>_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.json      the result record
    <output_dir>/t1-linear.tsv    one row per input: status, reason, times, quality

Every file is written atomically; the JSON record is written last and marks the scan as done, so
a re-run skips scans whose three files exist (and re-tries failed ones).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

from scripts.common.files import atomic_write, write_rows_atomic
from scripts.common.inputs import bids_entities, entity_label, find_scan_paths, strip_suffix

from .core import PreprocessingResult, T1LinearSettings, preprocess_t1_linear
from .errors import PreprocessingError
from .template import SPACE_LABEL

try:  # the progress bar is optional
    from tqdm import tqdm

    has_tqdm = True
except ImportError:  # pragma: no cover
    tqdm, has_tqdm = None, False

__all__ = ["BatchPreprocessor", "ScanInput", "TSV_COLUMNS", "find_scans", "output_paths", "process_scan"]

#: Columns of the batch table, in order.
TSV_COLUMNS = (
    "participant_id",
    "session_id",
    "input",
    "status",
    "reason",
    "notes",
    "seconds",
    "correlation",
    "metric",
    "scale_min",
    "scale_max",
    "t_read",
    "t_n4",
    "t_register",
    "t_resample",
    "t_quality",
    "t_write",
    "image",
    "transform",
)
DEFAULT_SESSION = "ses-M000"


@dataclass(frozen=True)
class ScanInput:
    """One input scan and the names of its outputs.

    Attributes:
        path: NIfTI file or DICOM folder.
        participant_id: ``sub-<label>``.
        session_id: ``ses-<label>`` (``ses-M000`` when the input has none).
        prefix: file-name prefix of the outputs (``sub-X_ses-Y[_other-entities]``).
    """

    path: Path
    participant_id: str
    session_id: str
    prefix: str


def _label(text: str) -> str:
    return entity_label(text) or "unnamed"


def find_scans(input_dir: str | Path) -> list[ScanInput]:
    """The scans of a BIDS dataset, a CAPS tree, a plain folder, or a single file/DICOM folder, as found by
    the bundle's one input resolver (:func:`scripts.common.inputs.find_scan_paths`).

    - BIDS (``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``) and CAPS: participant and session come from the path,
      other entities (``acq-``, ``run-``...) stay in the output prefix.
    - Plain folder: every NIfTI/Analyze/MetaImage/NRRD file and every folder holding a DICOM series
      (searched recursively, symbolic links followed once). The participant label is the path relative to
      ``input_dir`` without extension and non-alphanumeric characters; the session is ``ses-M000``.
    """
    root = Path(input_dir)
    if not root.exists():
        raise FileNotFoundError(f"input_dir {root} does not exist")
    if root.is_file():
        label = _label(strip_suffix(root.name))
        return [ScanInput(root, f"sub-{label}", DEFAULT_SESSION, f"sub-{label}_{DEFAULT_SESSION}")]
    layout, paths = find_scan_paths(root)
    scans: list[ScanInput] = []
    for f in paths:
        if layout in ("bids", "caps"):
            entities = bids_entities(f)
            session = entities["session_id"] or DEFAULT_SESSION
            stem = strip_suffix(f.name)
            stem = stem[: -len("_T1w")] if stem.endswith("_T1w") else stem
            others = [e for e in stem.split("_") if not e.startswith(("sub-", "ses-"))]
            prefix = "_".join([entities["participant_id"], session, *others])
            scans.append(ScanInput(f, entities["participant_id"], session, prefix))
            continue
        label = _label(strip_suffix(root.name if layout == "dicom" else str(f.relative_to(root))))
        scans.append(ScanInput(f, f"sub-{label}", DEFAULT_SESSION, f"sub-{label}_{DEFAULT_SESSION}"))
    return scans


def output_paths(output_dir: str | Path, scan: ScanInput) -> dict[str, Path]:
    """Paths of the image, transform and record of a scan in the CAPS-like output tree."""
    folder = Path(output_dir) / "subjects" / scan.participant_id / scan.session_id / "t1_linear"
    stem = f"{scan.prefix}_space-{SPACE_LABEL}_desc-Crop_res-1x1x1_T1w"
    return {
        "image": folder / f"{stem}.nii.gz",
        "transform": folder / f"{scan.prefix}_space-{SPACE_LABEL}_res-1x1x1_affine.mat",
        "record": folder / f"{stem}.json",
    }


def _row(scan: ScanInput, result: PreprocessingResult, output_dir: Path) -> dict[str, Any]:
    steps = result.step_seconds
    row: dict[str, Any] = {
        "participant_id": scan.participant_id,
        "session_id": scan.session_id,
        "input": str(scan.path),
        "status": result.status,
        "reason": result.reason,
        "notes": result.notes,
        "seconds": result.seconds,
        "correlation": round(result.correlation, 4),
        "metric": round(result.metric, 4),
        "scale_min": round(min(result.scales), 4),
        "scale_max": round(max(result.scales), 4),
        "image": "",
        "transform": "",
    }
    for step in ("read", "n4", "register", "resample", "quality", "write"):
        row[f"t_{step}"] = steps.get(step, "")
    for key in ("image", "transform"):
        if key in result.outputs:
            row[key] = os.path.relpath(result.outputs[key], output_dir)
    return row


def process_scan(
    scan: ScanInput, output_dir: str | Path, settings: T1LinearSettings | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Preprocess one scan and write its outputs; never raises for a bad scan.

    Returns:
        The scan's table row (see :data:`TSV_COLUMNS`). A scan whose outputs are all present
        (and ``overwrite`` is false) is not re-run: its row comes from its JSON record.
    """
    output_dir = Path(output_dir)
    paths = output_paths(output_dir, scan)
    if not overwrite and all(p.exists() for p in paths.values()):
        try:
            result = PreprocessingResult.from_dict(json.loads(paths["record"].read_text()))
            return _row(scan, result, output_dir)
        except (OSError, ValueError, TypeError):
            pass  # unreadable record: redo the scan
    start = time.perf_counter()
    try:
        image, result = preprocess_t1_linear(scan.path, settings)
        t = time.perf_counter()
        try:
            atomic_write(paths["image"], lambda tmp: nib.save(image, str(tmp)))
            atomic_write(paths["transform"], lambda tmp: sitk.WriteTransform(result.transform, str(tmp)))
            result.outputs = {"image": str(paths["image"]), "transform": str(paths["transform"])}
            result.step_seconds["write"] = round(time.perf_counter() - t, 3)
            result.seconds = round(time.perf_counter() - start, 3)
            record = json.dumps(result.to_dict(), indent=1)
            atomic_write(paths["record"], lambda tmp: tmp.write_text(record))
        except (OSError, RuntimeError) as err:
            raise PreprocessingError(scan.path, "write_failed", f"{type(err).__name__}: {err}") from None
    except PreprocessingError as err:
        result = getattr(err, "result", None) or PreprocessingResult(path=str(scan.path))
        result.status, result.reason = err.code, err.reason
        result.seconds = round(time.perf_counter() - start, 3)
    except Exception as err:  # noqa: BLE001 - a batch over thousands of scans must not die on one
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        result = PreprocessingResult(path=str(scan.path), status="internal_error", reason=last[:500])
        result.seconds = round(time.perf_counter() - start, 3)
    return _row(scan, result, output_dir)


def _worker_init(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def write_table(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the batch table (TSV, :data:`TSV_COLUMNS`) atomically."""

    return write_rows_atomic(rows, path, TSV_COLUMNS, delimiter="\t")


class BatchPreprocessor:
    """t1-linear preprocessing of every scan of a folder or BIDS dataset, in parallel.

    Args:
        input_dir: a BIDS dataset, a folder of NIfTI files / DICOM series folders, or one scan.
        output_dir: root of the CAPS-like output tree (created).
        settings: :class:`~scripts.preprocessing.core.T1LinearSettings` or a dict of its fields.
        num_workers: worker processes (1: run in this process).
        threads_per_worker: ITK threads per worker (default: CPU count // num_workers).
        overwrite: redo scans whose outputs are present.
        table_name: file name of the TSV table inside ``output_dir``.
        progress: show a progress bar (tqdm) on stderr.
    """

    def __init__(
        self,
        input_dir: str | Path,
        output_dir: str | Path,
        settings: T1LinearSettings | Mapping[str, Any] | None = None,
        num_workers: int = 1,
        threads_per_worker: int | None = None,
        overwrite: bool = False,
        table_name: str = "t1-linear.tsv",
        progress: bool = True,
    ) -> None:
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)
        self.settings = T1LinearSettings.coerce(settings)
        self.num_workers = max(1, int(num_workers))
        cpus = os.cpu_count() or 1
        self.threads = int(threads_per_worker) if threads_per_worker else max(1, cpus // self.num_workers)
        self.overwrite = bool(overwrite)
        self.table_path = self.output_dir / table_name
        self.progress = progress

    def run(self) -> list[dict[str, Any]]:
        """Process all scans; write and return the table rows (input order)."""
        scans = find_scans(self.input_dir)
        rows: list[dict[str, Any] | None] = [None] * len(scans)
        seen: dict[str, int] = {}
        todo: list[int] = []
        for i, scan in enumerate(scans):
            if scan.prefix in seen:
                first = scans[seen[scan.prefix]].path
                result = PreprocessingResult(
                    path=str(scan.path), status="duplicate_id", reason=f"same output name {scan.prefix} as {first}"
                )
                rows[i] = _row(scan, result, self.output_dir)
            else:
                seen[scan.prefix] = i
                todo.append(i)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(todo), desc="t1-linear", unit="scan") if (self.progress and has_tqdm) else None

        def done(i: int, row: dict[str, Any]) -> None:
            rows[i] = row
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{scans[i].prefix}: {row['status']}")

        if self.num_workers == 1:
            _worker_init(self.threads)
            for i in todo:
                done(i, process_scan(scans[i], self.output_dir, self.settings, self.overwrite))
        else:
            # spawn, not fork: the parent may hold torch/OpenMP threads
            with ProcessPoolExecutor(
                self.num_workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(self.threads,)
            ) as pool:
                futures: dict[Future, int] = {
                    pool.submit(process_scan, scans[i], self.output_dir, self.settings, self.overwrite): i for i in todo
                }
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        row = future.result()
                    except Exception as err:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                        result = PreprocessingResult(
                            path=str(scans[i].path), status="internal_error", reason=f"worker failed: {err!r}"[:500]
                        )
                        row = _row(scans[i], result, self.output_dir)
                    done(i, row)
        if bar is not None:
            bar.close()
        final = [r for r in rows if r is not None]
        write_table(final, self.table_path)
        return final
