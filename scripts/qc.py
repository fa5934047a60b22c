"""Batch quality control: a motion probability, a decision and a picture for every scan of a batch.

The job behind ``configs/inference.yaml``. It takes a folder (searched recursively), a BIDS dataset,
a CSV/TSV list or a datalist, and writes one TSV per run, ``<output_dir>/qc.tsv``, with one row per
input (see :data:`TSV_COLUMNS`) and an HTML report (:mod:`scripts.qc_report`).

It never dies on one scan: every input ends with a row whose ``status`` is ``ok``, ``warning``
(scored, with a caveat in ``reason``) or an error code of :data:`QC_STATUSES` (not scored). It is
resumable: results go to an append-only journal (one JSON line per scan, flushed and fsynced) and
the TSV is rewritten atomically from it; a re-run skips what is recorded, so a run killed at any
moment restarts and ends with every input exactly once. A scan whose processing killed a worker
process (or the whole job, e.g. the out-of-memory killer) is retried alone; if it dies alone twice it
is recorded as ``worker_crashed``.

Pipeline per scan (in worker processes, overlapping with inference in the main process):
read (ITK: NIfTI, MetaImage, NRRD, DICOM series folder; reoriented to RAS) -> input checks ->
t1-linear space? (shape and affine, or ``input_space``) else T1Linear preprocessing (N4 + affine to
MNI) -> brain checks in t1-linear space -> the config's intensity normalisation. The main process
batches the scans through the network, adds a Grad-CAM saliency map and writes a thumbnail. On CPU the
network and its inputs are in channels-last 3D memory and glibc keeps freed memory for reuse
(:mod:`scripts.performance`, docs/performance.md); both are switches of :class:`QCJob`.

Exit code of ``python -m monai.bundle run --config_file configs/inference.yaml``: 0 when every input
has its row (whatever the statuses); 1 on a fatal problem before any scan is processed (``--input``
does not exist, weights fail their integrity check, bad config); 3 with ``--strict true`` when at
least one input failed (rows are still all written); 4 when an input has no row (re-run to complete).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts import performance
from scripts.common.files import write_rows_atomic
from scripts.common.grid import T1_LINEAR_ORIGIN, grid_voxel, t1_linear_grid
from scripts.common.statuses import SCORED_STATUSES, statuses
from scripts.common.values import as_bool, as_probability
from scripts.datalist import bids_entities, load_datalist
from scripts.qc_report import thumbnail_name

__all__ = [
    "QC_STATUSES",
    "SCORED_STATUSES",
    "TSV_COLUMNS",
    "QCError",
    "ScanLoader",
    "QCJob",
    "bundle_version",
    "collect_inputs",
    "read_journal",
    "read_qc_table",
    "thumbnail_name",
]

logger = logging.getLogger(__name__)

#: Statuses of a row (a subset of :data:`scripts.common.statuses.STATUSES`). ``ok`` and ``warning`` rows
#: are scored; the others are not.
QC_STATUSES: dict[str, str] = statuses(
    "ok", "warning", "not_found", "empty_file", "empty_folder", "unsupported_format", "unreadable", "not_3d",
    "too_small", "low_resolution", "non_finite", "empty", "not_brain", "wrong_space", "dicom_missing_slice",
    "dicom_nonuniform_spacing", "registration_failed", "registration_diverged", "out_of_memory",
    "inference_failed", "worker_crashed", "internal_error",
)  # fmt: skip

#: Columns of ``qc.tsv``, in order.
TSV_COLUMNS = (
    "participant_id",
    "session_id",
    "path",
    "status",
    "reason",
    "prob_motion",
    "decision",
    "threshold",
    "input_space",
    "model_sha256",
    "bundle_version",
    "seconds",
)

#: File suffixes read as one volume; folders are read as DICOM series.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".hdr", ".dcm")
_ATTEMPTS = "attempts-rank{rank}.jsonl"
_JOURNAL = "journal-rank{rank}.jsonl"


class QCError(Exception):
    """A scan that cannot be scored: ``code`` (a key of :data:`QC_STATUSES`) and ``reason``."""

    # B042: never pickled (the loader turns it into a status inside the worker that raised it)
    def __init__(self, code: str, reason: str) -> None:  # noqa: B042
        if code not in QC_STATUSES:
            raise ValueError(f"unknown QC status {code!r}")
        super().__init__(f"[{code}] {reason}")
        self.code, self.reason = code, reason


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _has_suffix(name: str, suffixes: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(suffixes))


def _refuse_special_files(p: Path) -> None:
    """Raise ``unreadable`` when reading ``p`` would open something that is not a regular file: ``p``
    itself, the data file of an Analyze pair or a MetaImage header, or any file of a DICOM folder. A FIFO
    (or a device, or a socket) blocks the C readers of ITK and GDCM, where no time limit can stop them."""
    candidates = [p]
    if p.is_dir():
        candidates = [f for f in p.rglob("*") if not f.is_dir()]
    elif _has_suffix(p.name, (".hdr", ".img")):
        candidates.append(p.with_suffix(".img" if p.suffix.lower() == ".hdr" else ".hdr"))
    elif _has_suffix(p.name, (".mhd", ".nhdr")) and p.is_file():
        with open(p, "rb") as f:
            for line in f.read(65536).decode("latin-1").splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() in ("elementdatafile", "data file", "datafile") and value.strip():
                    name = value.strip().split()[0]
                    if name.upper() not in ("LOCAL", "LIST"):
                        candidates.append(p.parent / name)
    for f in candidates:
        if f.exists() and not f.is_file():
            raise QCError("unreadable", f"{f.name} is not a regular file (a FIFO, socket or device); not opened")


def _has_dicom_magic(path: Path) -> bool:
    """A regular file with DICOM's ``DICM`` marker at byte 128 (FIFOs and devices are never opened)."""
    try:
        if not path.is_file():  # regular files only: opening a FIFO would block
            return False
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_candidate(folder: Path, has_subfolders: bool) -> bool:
    """A folder holding a DICOM series: a file with the DICOM marker (other files or sub-folders beside
    it, e.g. ``notes.txt``, do not matter), or, for files without the marker (old ACR-NEMA exports), a
    leaf folder whose visible files are all extension-less or ``.dcm``."""
    files = sorted(f for f in folder.iterdir() if not f.name.startswith(".") and f.is_file())
    if any(f.suffix.lower() == ".dcm" or _has_dicom_magic(f) for f in files):
        return True
    return (
        not has_subfolders
        and bool(files)
        and not any(_has_suffix(f.name, IMAGE_SUFFIXES[:-1]) for f in files)
        and not any(f.suffix.lower() in (".json", ".tsv", ".csv", ".txt", ".md") for f in files)
    )


def _scan_folder(root: Path) -> list[Path]:
    """Scans under a folder: BIDS ``sub-*/[ses-*/]anat/*_T1w.*`` when it is a BIDS dataset, else every
    volume file and every folder that holds a DICOM series, recursively (sorted). Symbolic links to
    folders are followed once; a link back into a folder already walked (a loop) is skipped."""
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if subjects and (root / "dataset_description.json").is_file():
        found = sorted(p for p in root.glob("sub-*/**/anat/*_T1w.*") if _has_suffix(p.name, (".nii", ".nii.gz")))
        if found:
            return found
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        volumes = [here / f for f in sorted(filenames) if _has_suffix(f, IMAGE_SUFFIXES[:-1]) and not f.startswith(".")]
        # an Analyze pair is one scan: its .img is read through the .hdr
        headers = {v.with_suffix("").name for v in volumes if v.suffix.lower() == ".hdr"}
        volumes = [v for v in volumes if not (v.suffix.lower() == ".img" and v.with_suffix("").name in headers)]
        if here != root and not volumes and _is_dicom_candidate(here, bool(dirnames)):
            out.append(here)
        out.extend(volumes)
    return out


def collect_inputs(source: str | os.PathLike | Iterable[Any], datalist_key: str = "test") -> list[dict[str, Any]]:
    """Items ``{"image", "participant_id", "session_id"}`` of everything a batch QC job is pointed at.

    ``source`` may be a folder (recursive; a BIDS dataset, with ``dataset_description.json``, yields
    its ``anat/*_T1w`` images), a datalist JSON (split ``datalist_key``), a CSV/TSV list with an
    ``image`` or ``path`` column (relative paths against its folder; every listed path becomes an
    item, even one that does not exist or is not an image: it gets an error row), one file, or a list
    of these (where a path that does not exist becomes an item). Items are de-duplicated by absolute
    path (first wins).

    Raises:
        FileNotFoundError: ``source`` itself does not exist (a fatal error: nothing to do).
    """
    if not isinstance(source, (str, os.PathLike)):
        items = []
        for s in source:  # in a list, a path that does not exist is an input (it gets a not_found row)
            missing = isinstance(s, (str, os.PathLike)) and not Path(os.path.expanduser(str(s))).exists()
            items += [{"image": os.path.expanduser(str(s))}] if missing else collect_inputs(s, datalist_key)
    else:
        path = Path(os.path.expanduser(str(source)))
        if not path.exists():
            raise FileNotFoundError(f"QC input {path} does not exist.")
        if path.is_dir():
            items = [{"image": str(p)} for p in _scan_folder(path)]
            if not items:
                logger.warning("folder %s holds no scan (NIfTI, MetaImage, NRRD or DICOM folder).", path)
        elif path.suffix.lower() == ".json":
            items = load_datalist(path, datalist_key)
        elif path.suffix.lower() in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not a column
                rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
            column = next((c for c in ("image", "path") if rows and c in rows[0]), None)
            if rows and column is None:
                raise ValueError(f"{path} needs an 'image' or 'path' column.")
            items = []
            for line, row in enumerate(rows, start=2):
                cell = (row.pop(column) or "").strip()
                row = {k: v for k, v in row.items() if isinstance(k, str) and v is not None}  # short/long lines
                if not cell:  # still an input: it gets a not_found row naming the line
                    items.append({**row, "image": f"{path} line {line}: empty '{column}' cell"})
                    continue
                image = Path(os.path.expanduser(cell))
                items.append({**row, "image": str(image if image.is_absolute() else path.parent / image)})
        else:
            items = [{"image": str(path)}]
    seen: set[str] = set()
    out = []
    for item in items:
        key = os.path.abspath(str(item["image"]))
        if key in seen:
            logger.warning("input %s is listed twice; scored once.", key)
            continue
        seen.add(key)
        entities = bids_entities(key)
        out.append({**item, "image": key, **{k: item.get(k) or v for k, v in entities.items()}})
    return out


def bundle_version(bundle_root: str | os.PathLike = ".") -> str:
    """The ``version`` of ``<bundle_root>/configs/metadata.json``, else of this package's bundle."""
    for root in (Path(bundle_root), Path(__file__).resolve().parents[1]):
        meta = root / "configs" / "metadata.json"
        if meta.is_file():
            try:
                return str(json.loads(meta.read_text()).get("version", "unknown"))
            except (OSError, ValueError):
                continue
    return "unknown"


# ---------------------------------------------------------------------------------------------
# per-scan loading (worker processes)
# ---------------------------------------------------------------------------------------------
def _check_nifti_bytes(path: Path, img: Any) -> None:
    """Refuse, before allocating anything, a NIfTI file holding fewer bytes than its header declares
    (a 73-byte file can claim 1450^3 voxels), or a ``.nii.gz`` with a broken gzip stream (CRC error,
    truncation; nibabel stops reading at the declared size and never sees the gzip trailer)."""
    import gzip
    import zlib

    header = img.header
    if np.iscomplexobj(np.empty(0, dtype=header.get_data_dtype())):
        raise QCError("not_3d", f"complex-valued voxels ({header.get_data_dtype()}); a magnitude image is needed")
    declared = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * int(
        header.get_data_dtype().itemsize
    )
    if path.name.lower().endswith(".gz"):
        total = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):  # streamed: the CRC is checked at the end of the stream
                    total += len(chunk)
                    if total > declared + (1 << 30):
                        break  # far more data than declared: not a size problem, stop reading
        except (OSError, EOFError, zlib.error) as err:
            raise QCError("unreadable", f"broken gzip stream ({type(err).__name__}: {str(err)[:200]})") from None
    else:
        total = path.stat().st_size
    if total < declared:
        raise QCError(
            "unreadable", f"truncated: the header declares {declared:,} bytes of image, the file holds {total:,}"
        )


def _read_nifti(path: Path) -> Any:
    """Read a NIfTI file with nibabel (as MONAI's LoadImage does), checking it fully, into a RAS ITK image.

    nibabel refuses truncated files and keeps NaN/Inf voxels (ITK's reader may silently zero-fill
    a truncated ``.nii.gz``). Raises :class:`QCError` (``unreadable``, ``not_3d``, ``non_finite``) or
    ``PreprocessingError`` (``too_small``, ``unreadable`` for a sheared affine).
    """
    import nibabel as nib
    import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

    from scripts.preprocessing.io import _check_geometry, nifti_to_image

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            extra = f" with {shape[3]} volumes" if len(shape) == 4 else ""
            raise QCError("not_3d", f"{len(shape)}D image{extra} (shape {tuple(img.shape)})")
        _check_nifti_bytes(path, img)
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except QCError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for corrupt files
        raise QCError(
            "unreadable", f"not a readable NIfTI file ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    finite = np.isfinite(data)
    if not finite.all():
        raise QCError("non_finite", f"{int((~finite).sum())} NaN or infinite voxels")
    image = nifti_to_image(nib.Nifti1Image(data, img.affine))
    _check_geometry(image, path)
    return sitk.DICOMOrient(image, "RAS")


class ScanLoader:
    """Turn one input item into a normalised t1-linear-space tensor, or an error record; never raises.

    Called in worker processes. Returns ``{"path", "participant_id", "session_id", "status",
    "reason", "input_space", "seconds", "image"}`` where ``image`` is a (1, X, Y, Z) float32 tensor
    (normalised) for scored statuses and absent otherwise.

    Args:
        spatial_size: the network's input grid (169x208x179 at 1 mm; smaller grids sample the same box).
        normalize: callable on ``{"image": MetaTensor}`` (the config's intensity normalisation).
        input_space: ``"auto"`` (t1-linear if shape and affine say so), ``"t1_linear"`` or ``"raw"``.
        max_voxel_mm: raw scans with a voxel coarser than this along an axis get ``low_resolution``.
        min_brain_correlation: t1-linear images whose smoothed correlation with the template (inside
            its brain mask, :mod:`scripts.preprocessing.quality`) is lower get ``not_brain``.
        doubtful_brain_correlation: below this (and above ``min_brain_correlation``) the scan is
            scored with a ``warning`` asking to check that it is a T1w brain. Motion never lowers the
            smoothed correlation to these levels on the calibration set (docs/gates.md).
        min_skull_ratio: mean intensity 4-12 mm outside the brain over the mean inside it; below
            this the image looks skull-stripped (``warning``; the model was trained on heads).
        t1_linear_settings: settings of :func:`scripts.preprocessing.preprocess_t1_linear`.
        attempts_path: JSONL file where each start is logged (crash isolation); None: no log.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] = (169, 208, 179),
        normalize: Callable[[dict], dict] | None = None,
        input_space: str = "auto",
        max_voxel_mm: float = 3.0,
        min_brain_correlation: float = 0.4,
        doubtful_brain_correlation: float = 0.5,
        min_skull_ratio: float = 0.1,
        t1_linear_settings: Mapping[str, Any] | None = None,
        attempts_path: str | os.PathLike | None = None,
    ) -> None:
        if input_space not in ("auto", "t1_linear", "raw"):
            raise ValueError(f"input_space must be 'auto', 't1_linear' or 'raw', got {input_space!r}.")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.normalize = normalize
        self.input_space = input_space
        self.max_voxel_mm = float(max_voxel_mm)
        self.min_brain_correlation = float(min_brain_correlation)
        self.doubtful_brain_correlation = float(doubtful_brain_correlation)
        self.min_skull_ratio = float(min_skull_ratio)
        self.t1_linear_settings = dict(t1_linear_settings or {})
        self.attempts_path = str(attempts_path) if attempts_path else None
        self.isolated = False
        self.in_worker = False  # set by QCJob: True when loading runs in worker processes

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        path = str(item["image"])
        start = time.perf_counter()
        out: dict[str, Any] = {
            "path": path,
            "participant_id": item.get("participant_id", ""),
            "session_id": item.get("session_id", ""),
            "input_space": "",
        }
        self._log_start(path)
        try:
            image, space, warnings = self.load(path)
            out.update(
                status="warning" if warnings else "ok", reason="; ".join(warnings), input_space=space, image=image
            )
        except QCError as err:
            out.update(status=err.code, reason=err.reason)
        except Exception as err:  # noqa: BLE001 - one scan must never stop the batch
            from scripts.preprocessing.errors import PreprocessingError

            if isinstance(err, PreprocessingError):
                out.update(status=err.code if err.code in QC_STATUSES else "internal_error", reason=err.reason)
            elif isinstance(err, MemoryError):
                out.update(status="out_of_memory", reason="out of memory while reading or preprocessing")
            else:
                last = traceback.format_exception_only(type(err), err)[-1].strip()
                out.update(status="internal_error", reason=last[:500])
        out["seconds"] = time.perf_counter() - start
        return out

    def _log_start(self, path: str) -> None:
        if self.attempts_path:
            record = {"path": path, "isolated": self.isolated, "in_worker": self.in_worker, "pid": os.getpid()}
            line = json.dumps(record) + "\n"
            with open(self.attempts_path, "a") as f:
                f.write(line)

    # -- steps ---------------------------------------------------------------------------------
    def load(self, path: str) -> tuple[torch.Tensor, str, list[str]]:
        """(normalised (1, X, Y, Z) tensor, ``"t1_linear"`` or ``"raw"``, warnings); raises QCError."""
        from scripts.preprocessing.io import image_to_array, ras_affine, read_image

        p = Path(path)
        if not p.exists():
            raise QCError("not_found", "no such file or folder")
        _refuse_special_files(p)  # a FIFO or device would block the reader forever
        if p.is_dir():
            if not any(f.is_file() for f in p.rglob("*")):
                raise QCError("empty_folder", "the folder holds no file")
        else:
            if p.stat().st_size == 0:
                raise QCError("empty_file", "the file is empty (0 bytes)")
            if not _has_suffix(p.name, IMAGE_SUFFIXES):
                raise QCError(
                    "unsupported_format",
                    f"extension {''.join(p.suffixes) or '(none)'} is not one of {', '.join(IMAGE_SUFFIXES)} "
                    "(or a DICOM series folder)",
                )
        if p.is_file() and _has_suffix(p.name, (".nii", ".nii.gz")):
            image = _read_nifti(p)
        else:
            image, _ = read_image(p)  # PreprocessingError: unreadable, not_3d, too_small, dicom_*
        array = image_to_array(image)
        affine = ras_affine(image)
        finite = np.isfinite(array)
        if not finite.all():
            raise QCError("non_finite", f"{int((~finite).sum())} NaN or infinite voxels")
        lo, hi = float(array.min()), float(array.max())
        if hi <= lo:
            raise QCError("empty", f"constant image (all voxels = {lo:g})")
        if hi <= 0:
            raise QCError("empty", f"no positive intensity (max {hi:g})")
        space = self._space(array.shape, affine, p)
        warnings: list[str] = []
        if space == "raw":
            spacing = np.asarray(image.GetSpacing())
            if spacing.max() > self.max_voxel_mm:
                raise QCError(
                    "low_resolution",
                    f"voxel size {tuple(round(float(s), 2) for s in spacing)} mm; at most {self.max_voxel_mm:g} mm "
                    "along every axis is supported (a 3D T1w acquisition)",
                )
            array = self._t1_linear(image)
        del image
        array = np.ascontiguousarray(array, dtype=np.float32)
        warnings += self._brain_checks(array)
        from monai.data import MetaTensor

        tensor = MetaTensor(
            torch.from_numpy(array)[None], affine=torch.as_tensor(t1_linear_grid(grid_voxel(self.spatial_size))[1])
        )
        tensor.meta["filename_or_obj"] = path
        if self.normalize is not None:
            tensor = self.normalize({"image": tensor})["image"]
        tensor = torch.as_tensor(tensor).float()
        if not bool(torch.isfinite(tensor).all()):
            raise QCError("empty", "intensity normalisation produced non-finite values")
        return tensor, space, warnings

    def _space(self, shape: Sequence[int], affine: np.ndarray, path: Path) -> str:
        on_grid = tuple(shape) == self.spatial_size
        if on_grid:
            voxel = grid_voxel(self.spatial_size)
            expected = np.diag([voxel, voxel, voxel, 1.0])
            expected[:3, 3] = T1_LINEAR_ORIGIN
            on_grid = bool(np.allclose(affine[:3, :3], expected[:3, :3], atol=1e-3 * voxel)) and bool(
                np.allclose(affine[:3, 3], expected[:3, 3], atol=0.5 * voxel)
            )
        if self.input_space == "raw":
            return "raw"
        if self.input_space == "t1_linear":
            if tuple(shape) != self.spatial_size:
                raise QCError("wrong_space", f"shape {tuple(shape)} is not the t1-linear grid {self.spatial_size}")
            if not on_grid:
                spacing = tuple(round(float(v), 3) for v in np.linalg.norm(affine[:3, :3], axis=0))
                origin = tuple(round(float(v), 1) for v in affine[:3, 3])
                raise QCError(
                    "wrong_space",
                    f"the affine (voxel {spacing} mm, origin {origin} mm, RAS) is not the t1-linear grid's "
                    f"(voxel {grid_voxel(self.spatial_size):g} mm, origin {T1_LINEAR_ORIGIN} mm, no rotation)",
                )
            return "t1_linear"
        return "t1_linear" if on_grid else "raw"

    def _t1_linear(self, image: Any) -> np.ndarray:
        """T1Linear preprocessing of a raw ITK image, then resampling to ``spatial_size`` if smaller."""
        from scripts.preprocessing import preprocess_t1_linear

        nifti, _ = preprocess_t1_linear(image, self.t1_linear_settings or None)
        array = np.asarray(nifti.dataobj, dtype=np.float32)
        if array.shape != self.spatial_size:
            from scipy import ndimage

            voxel = grid_voxel(self.spatial_size)
            coords = np.meshgrid(*[np.arange(n) * voxel for n in self.spatial_size], indexing="ij")
            array = ndimage.map_coordinates(array, coords, order=1, mode="nearest").astype(np.float32)
        return array

    def warm_up(self) -> None:
        """Compute the template references once (forked workers inherit them)."""
        from scripts.preprocessing.quality import brain_evidence

        brain_evidence(np.zeros(self.spatial_size, dtype=np.float32))  # fills the template caches

    def _brain_checks(self, array: np.ndarray) -> list[str]:
        from scripts.preprocessing.quality import BrainGate, template_on_grid

        gate = BrainGate(refuse_below=self.min_brain_correlation, doubt_below=self.doubtful_brain_correlation)
        verdict, reason, _ = gate.check(array)
        if verdict == "not_brain":
            raise QCError("not_brain", reason)
        warnings = [reason] if verdict == "doubtful" else []
        _, mask, shell = template_on_grid(self.spatial_size)
        inside = float(np.abs(array[mask]).mean())
        ratio = float(np.abs(array[shell]).mean()) / inside if inside > 0 else 0.0
        if ratio < self.min_skull_ratio:
            warnings.append(
                f"looks skull-stripped (signal 4-12 mm outside the brain is {ratio:.2f} of the brain's, "
                f"< {self.min_skull_ratio:g}); the model was trained on images with skull and scalp"
            )
        return warnings


# ---------------------------------------------------------------------------------------------
# journal and table
# ---------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a torn or corrupt line (killed mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "path" in record:
                out.append(record)
    return out


def _lock_output(state_dir: Path, rank: int) -> Any:
    """An exclusive lock on ``state_dir`` for this rank, held until the process ends (the returned
    file); two jobs on one output folder would both do all the work. Raises RuntimeError when held."""
    import fcntl

    f = open(state_dir / f"lock-rank{rank}", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(
            f"another QC job ({holder}) is writing to {state_dir.parent}; wait for it or use another --output_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def _repair_journal(path: Path) -> None:
    """Cut a torn last line (a write stopped by a full disk or a kill) off a journal before appending
    to it; otherwise the next record would be glued to it and lost with it. The torn record's scan has
    no row yet, so it is redone."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1  # journals are small: ~500 bytes a scan
        logger.warning("journal %s ends with a torn record (%d bytes); removing it.", path, size - keep)
        f.truncate(keep)


def read_journal(state_dir: str | os.PathLike, model_sha256: str | None = None) -> dict[str, dict[str, Any]]:
    """Rows recorded by all ranks' journals in ``state_dir``, keyed by path.

    With ``model_sha256``, only rows scored by that model count (a re-run with other weights redoes
    the scans); otherwise the first record of a path wins.
    """
    rows: dict[str, dict[str, Any]] = {}
    for journal in sorted(Path(state_dir).glob("journal-rank*.jsonl")):
        for record in _read_jsonl(journal):
            if model_sha256 is None or record.get("model_sha256") == model_sha256:
                rows.setdefault(record["path"], record)
    return rows


def read_qc_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``qc.tsv`` (paths that are not UTF-8 come back as the same ``str`` they were written from)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    # a file name that is not UTF-8 (os.listdir gives it surrogate escapes) is written as its own bytes
    write_rows_atomic(rows, path, TSV_COLUMNS, delimiter="\t", errors="surrogateescape")


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
def _load_in_worker(loader: ScanLoader, item: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``loader`` in a worker process; the image travels back as a numpy array."""
    out = loader(item)
    if "image" in out:
        out["image"] = out["image"].numpy()
    return out


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (a killed QC job must not leave ~1 GB
    workers behind); exit at once if the parent is already gone. A no-op elsewhere."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(threads: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    try:
        import SimpleITK as sitk  # noqa: N813 - the alias of SimpleITK's own documentation

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    except ImportError:  # pragma: no cover
        pass
    torch.set_num_threads(1)


class _WorkerDied(RuntimeError):
    pass


class QCJob:
    """Batch QC of every input: never dies on a scan, resumable, one TSV + one HTML report.

    Args:
        input: what :func:`collect_inputs` takes. datalist_key: split of a datalist input.
        network: the classifier (logits of shape (B, num_classes)).
        output_dir: where ``qc.tsv``, ``qc_report.html``, ``qc_thumbnails/`` and ``.qc/`` (journal) go.
        loader: a :class:`ScanLoader`.
        ckpt_path: weights, loaded into ``network`` after the integrity check of
            :func:`scripts.integrity.verify_file` (``bundle_root``'s ``large_files.yml``); None: use as is.
        bundle_root: bundle root (integrity check, version).
        threshold: decision threshold on the motion probability.
        device: network device. batch_size: scans per forward pass. num_workers: preprocessing
            worker processes (0: in the main process). prefetch_factor: batches each worker prepares ahead.
        motion_index: class index of motion.
        inferer: optional MONAI inferer ``inferer(inputs, network)``.
        saliency: ``"gradcam"`` (MONAI GradCAM on ``saliency_layer``), ``"occlusion"`` (MONAI
            OcclusionSensitivity, slower) or ``"none"``.
        saliency_layer: the module Grad-CAM explains; None: the one the network declares (its
            ``saliency_layer`` attribute, see :mod:`scripts.networks`); a network declaring none
            (ViT3D) is scored without saliency maps.
        thumbnails: write a JPEG per scored scan (three central slices + saliency) for the report.
        report: write ``qc_report.html`` at the end (rank 0).
        progress: tqdm progress bar (rate, ETA) on stderr.
        flush_every: rewrite ``qc.tsv`` every this many new rows (it is always written at the end).
        strict: raise ``SystemExit(3)`` at the end when an input failed.
        multiprocessing_context: worker start method (None: the platform default).
        channels_last: network and inputs in channels-last 3D memory (faster Conv3d on CPU; same results
            within float rounding).
        tune_allocator: :func:`scripts.performance.tune_allocator` at the start of :meth:`run` (a process
            setting, inherited by the preprocessing workers; a no-op off Linux/glibc).
        rank, world_size: shard of this process (default: from ``torch.distributed`` when
            initialised, else 0 of 1). Rank 0 merges every rank's journal into the TSV.
    """

    def __init__(
        self,
        input: Any,
        network: torch.nn.Module,
        output_dir: str | os.PathLike,
        loader: ScanLoader,
        ckpt_path: str | os.PathLike | None = None,
        bundle_root: str | os.PathLike = ".",
        threshold: float = 0.5,
        datalist_key: str = "test",
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        motion_index: int = 1,
        inferer: Callable | None = None,
        saliency: str = "gradcam",
        saliency_layer: str | None = None,
        thumbnails: bool = True,
        report: bool = True,
        report_page_size: int = 50,
        progress: bool = True,
        flush_every: int = 200,
        strict: bool = False,
        multiprocessing_context: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        channels_last: bool = True,
        tune_allocator: bool = True,
    ) -> None:
        if saliency not in ("gradcam", "occlusion", "none"):
            raise ValueError(f"saliency must be 'gradcam', 'occlusion' or 'none', got {saliency!r}.")
        self.input = input
        self.datalist_key = datalist_key
        self.network = network
        self.output_dir = Path(output_dir)
        self.state_dir = self.output_dir / ".qc"
        self.loader = loader
        self.ckpt_path = ckpt_path
        self.bundle_root = bundle_root
        self.threshold = as_probability(threshold, "threshold")
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.num_workers = max(0, int(num_workers))
        self.prefetch_factor = max(1, int(prefetch_factor))
        self.motion_index = int(motion_index)
        self.inferer = inferer
        self.saliency = saliency
        # the network declares its own Grad-CAM layer (scripts.networks); an argument overrides it
        self.saliency_layer = saliency_layer or getattr(network, "saliency_layer", None)
        if self.saliency == "gradcam" and not self.saliency_layer:
            logger.warning(
                "%s declares no saliency layer for Grad-CAM; scoring without saliency maps.", type(network).__name__
            )
            self.saliency = "none"
        self.thumbnails = as_bool(thumbnails, "thumbnails")
        self.report = as_bool(report, "report")
        self.report_page_size = int(report_page_size)
        self.progress = as_bool(progress, "progress")
        self.flush_every = max(1, int(flush_every))
        self.strict = as_bool(strict, "strict")
        self.multiprocessing_context = multiprocessing_context
        self.channels_last = as_bool(channels_last, "channels_last")
        self.tune_allocator = as_bool(tune_allocator, "tune_allocator")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = int(rank) if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        self.world_size = (
            int(world_size) if world_size is not None else (torch.distributed.get_world_size() if dist_on else 1)
        )
        self.model_sha256 = ""
        self.version = bundle_version(bundle_root)
        self._journal_file: Any = None
        self._lock: Any = None
        self._bar: Any = None
        self._new_rows = 0
        self._cam: Any = None
        self._logits: torch.Tensor | None = None

    # -- setup ---------------------------------------------------------------------------------
    def _load_weights(self) -> None:
        from scripts.integrity import file_hash, verify_file

        if self.ckpt_path is None:
            self.model_sha256 = "untrained"
        else:
            verify_file(self.ckpt_path, self.bundle_root)  # WeightIntegrityError: fatal
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
            self.network.load_state_dict(state)
            self.model_sha256 = file_hash(self.ckpt_path)
        performance.channels_last(self.network.to(self.device).eval(), self.channels_last)

    @property
    def table_path(self) -> Path:
        return self.output_dir / "qc.tsv"

    # -- main ----------------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        """Process every input not yet recorded; returns ``{status: count}`` over all inputs."""
        items = collect_inputs(self.input, self.datalist_key)  # FileNotFoundError: fatal
        performance.tune_allocator(self.tune_allocator)
        self._load_weights()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "qc_thumbnails").mkdir(parents=True, exist_ok=True)
        shard = items[self.rank :: self.world_size]
        done = self._recorded()
        if self.thumbnails:  # a scored row whose thumbnail was lost is redone (same model: same row)
            thumbs = self.output_dir / "qc_thumbnails"
            done = {
                k: r
                for k, r in done.items()
                if r.get("status") not in SCORED_STATUSES or (thumbs / thumbnail_name(k)).is_file()
            }
        pending = [it for it in shard if it["image"] not in done]
        logger.info(
            "QC rank %d/%d: %d inputs in this shard, %d already recorded, %d to do (%d in total).",
            self.rank,
            self.world_size,
            len(shard),
            len(shard) - len(pending),
            len(pending),
            len(items),
        )
        if pending:  # computed once here, inherited by forked workers
            self.loader.warm_up()
        self._lock = _lock_output(self.state_dir, self.rank)  # RuntimeError: another job writes here
        journal = self.state_dir / _JOURNAL.format(rank=self.rank)
        _repair_journal(journal)
        self._journal_file = open(journal, "a")
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=len(shard),
                initial=len(shard) - len(pending),
                desc=f"QC rank {self.rank}",
                unit="scan",
                dynamic_ncols=True,
                position=self.rank,
            )
        try:
            self._process_all(pending)
        finally:
            self._journal_file.close()
            if self._bar is not None:
                self._bar.close()
        if self.world_size > 1:
            torch.distributed.barrier()
        counts: dict[str, int] = {}
        missing = 0
        if self.rank == 0:
            rows = self._write_outputs(items)
            for row in rows:
                counts[row["status"]] = counts.get(row["status"], 0) + 1
            missing = len(items) - len(rows)
            logger.info("QC finished: %d inputs, %s; table %s", len(rows), counts, self.table_path)
        if self.world_size > 1:
            torch.distributed.barrier()
        self._lock.close()  # releases the output folder
        self._lock = None
        if missing:  # never a silent success with an input lacking its row
            raise SystemExit(4)
        if self.strict and any(s not in SCORED_STATUSES for s in counts):
            raise SystemExit(3)
        return counts

    def _attempts(self) -> dict[str, list[dict[str, Any]]]:
        """Records of the attempts logs (starts, and the crashes the main process saw), by path."""
        records: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.state_dir.glob("attempts-rank*.jsonl")):
            for record in _read_jsonl(path):
                records.setdefault(record["path"], []).append(record)
        return records

    def _crashes_alone(self, key: str) -> int:
        """Times the scan ``key`` killed the process handling it while it was processed alone: crashes of
        a worker that this process saw, and in-process starts (a crash there kills this process too) that
        were not interrupted. A job killed or interrupted while a worker held the scan does not count."""
        count = 0
        for record in self._attempts().get(key, []):
            if record.get("crashed"):
                count += 1
            elif record.get("isolated") and not record.get("in_worker"):
                count += 1
            elif record.get("interrupted"):
                count -= 1
        return count

    def _log_attempt(self, key: str, **outcome: Any) -> None:
        with open(self.state_dir / _ATTEMPTS.format(rank=self.rank), "a") as f:
            f.write(json.dumps({"path": key, **outcome}) + "\n")

    def _process_all(self, pending: list[dict[str, Any]]) -> None:
        self.loader.attempts_path = str(self.state_dir / _ATTEMPTS.format(rank=self.rank))
        remaining = {it["image"]: it for it in pending}
        # scans that were in flight when an earlier run died go first, one at a time
        starts = self._attempts()
        suspects = [k for k in remaining if k in starts]
        while remaining:
            for key in suspects:
                if key not in remaining:
                    continue
                while key in remaining:
                    if self._crashes_alone(key) >= 2:  # killed its process twice while alone
                        self._record(
                            self._failure(
                                remaining[key],
                                "worker_crashed",
                                "the process handling this scan died twice while it was processed alone",
                            )
                        )
                        remaining.pop(key)
                        break
                    try:
                        self._run_loader([remaining[key]], isolated=True, remaining=remaining)
                    except _WorkerDied as err:
                        self._log_attempt(key, crashed=True)
                        logger.warning("a worker died on %s alone (%s); retrying once.", key, err)
                    except KeyboardInterrupt:
                        if self.num_workers == 0:  # the in-process start above was the user's, not the scan's
                            self._log_attempt(key, interrupted=True)
                        raise
            if not remaining:
                break
            try:
                self._run_loader(list(remaining.values()), isolated=False, remaining=remaining)
            except _WorkerDied as err:
                starts = self._attempts()
                suspects = [k for k in remaining if k in starts]
                logger.warning(
                    "a preprocessing worker died (%s); %d in-flight scans are retried alone.", err, len(suspects)
                )

    def _run_loader(self, items: list[dict[str, Any]], isolated: bool, remaining: dict[str, Any]) -> None:
        """Load ``items`` in worker processes (a window of ``num_workers * prefetch_factor`` in
        flight, so preprocessing overlaps inference) and score them in batches as they arrive.

        Raises:
            _WorkerDied: a worker process died (its pool is broken); the caller isolates suspects.
        """
        self.loader.isolated = isolated
        self.loader.in_worker = self.num_workers > 0
        batch_size = 1 if isolated else self.batch_size
        if self.num_workers == 0:
            for start in range(0, len(items), batch_size):
                self._score_and_record([self.loader(it) for it in items[start : start + batch_size]], remaining)
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        workers = 1 if isolated else self.num_workers
        window = 1 if isolated else workers * self.prefetch_factor
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context(self.multiprocessing_context)
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init, initargs=(threads, os.getpid())
        )
        queue = iter(items)
        inflight: dict[Any, dict[str, Any]] = {}
        ready: list[dict[str, Any]] = []
        try:
            while True:
                while len(inflight) < window:
                    item = next(queue, None)
                    if item is None:
                        break
                    inflight[pool.submit(_load_in_worker, self.loader, item)] = item
                if not inflight:
                    break
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for future in done:
                    inflight.pop(future)
                    try:
                        out = future.result()
                    except Exception as err:  # noqa: BLE001 - the loader never raises: the pool broke
                        for start in range(0, len(ready), batch_size):  # keep what already arrived
                            self._score_and_record(ready[start : start + batch_size], remaining)
                        raise _WorkerDied(f"{type(err).__name__}: {err}") from None
                    if "image" in out:
                        out["image"] = torch.from_numpy(out["image"])
                    ready.append(out)
                while len(ready) >= batch_size or (ready and not inflight):
                    self._score_and_record(ready[:batch_size], remaining)
                    ready = ready[batch_size:]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _score_and_record(self, batch: list[dict[str, Any]], remaining: dict[str, Any]) -> None:
        for row in self._score(batch):
            self._record(row)
            remaining.pop(row["path"], None)

    # -- inference -----------------------------------------------------------------------------
    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, C, X, Y, Z) batch on the network's device as a plain tensor (a MetaTensor's metadata would
        be carried through every operation), in channels-last 3D memory when enabled."""
        from monai.data import MetaTensor

        x = (x.as_tensor() if isinstance(x, MetaTensor) else x).to(self.device)
        return x.contiguous(memory_format=performance.CHANNELS_LAST) if self.channels_last and x.ndim == 5 else x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._to_device(x)
        with torch.no_grad():
            logits = self.inferer(x, self.network) if self.inferer is not None else self.network(x)
            return torch.softmax(logits.float(), dim=1)[:, self.motion_index].cpu()

    def _score(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Motion probabilities (and thumbnails) of the scored items of ``batch``; failures become statuses."""
        scored = [r for r in batch if r["status"] in SCORED_STATUSES]
        if scored:
            start = time.perf_counter()
            maps: dict[int, np.ndarray | None] = {}
            if self.thumbnails and self.saliency == "gradcam":  # one pass gives probability and map
                results = []
                for r in scored:
                    try:
                        prob, maps[id(r)] = self._gradcam(r["image"])
                        results.append((prob, "", ""))
                    except Exception as err:  # noqa: BLE001 - fall back to a plain forward pass
                        logger.warning("Grad-CAM failed for %s (%s); scoring without saliency.", r["path"], err)
                        self._free_memory()
                        results.append(self._score_one(r))
            else:
                try:
                    probs = self._forward(torch.stack([r["image"] for r in scored])).tolist()
                    results = [(p, "", "") for p in probs]
                except Exception:  # noqa: BLE001 - retried one by one below
                    self._free_memory()
                    results = [self._score_one(r) for r in scored]
            share = (time.perf_counter() - start) / len(scored)
            for r, (prob, code, reason) in zip(scored, results):
                r["seconds"] += share
                if prob is None:
                    r.update(status=code, reason=reason)
                    continue
                if not math.isfinite(prob):  # a broken network must not read as "no motion"
                    r.update(status="inference_failed", reason=f"the network's motion probability is {prob}")
                    continue
                r["prob_motion"] = prob
                if self.thumbnails:
                    t = time.perf_counter()
                    self._thumbnail(r, maps[id(r)] if id(r) in maps else self._occlusion(r))
                    r["seconds"] += time.perf_counter() - t
        for r in batch:
            r.pop("image", None)
        return batch

    def _score_one(self, r: dict[str, Any]) -> tuple[float | None, str, str]:
        try:
            return float(self._forward(r["image"][None])[0]), "", ""
        except Exception as err:  # noqa: BLE001
            self._free_memory()
            if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower():
                return None, "out_of_memory", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            return None, "inference_failed", last[:500]

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _gradcam(self, image: torch.Tensor) -> tuple[float, np.ndarray]:
        """Motion probability and Grad-CAM map ((X, Y, Z), [0, 1]) of one (1, X, Y, Z) image.

        MONAI's GradCAM on ``saliency_layer``, made cheap: the weights do not require gradients and
        the graph is cut at the target layer (its output becomes a leaf), so the backward pass only
        runs through the layers above it; the forward pass also gives the probability.
        """
        if self._cam is None:
            import warnings

            from monai.visualize import GradCAM

            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for param in self.network.parameters():
                param.requires_grad_(False)
            layer = dict(self.network.named_modules())[self.saliency_layer]
            layer.register_forward_hook(lambda module, args, output: output.detach().requires_grad_(True))
            self.network.register_forward_hook(lambda module, args, output: setattr(self, "_logits", output.detach()))
            self._cam = GradCAM(nn_module=self.network, target_layers=self.saliency_layer)
        sal = self._cam(self._to_device(image[None]), class_idx=self.motion_index)
        prob = torch.softmax(self._logits.float(), dim=1)[0, self.motion_index].item()
        return prob, sal.detach().cpu().numpy()[0, 0]

    def _occlusion(self, r: dict[str, Any]) -> np.ndarray | None:
        """MONAI occlusion sensitivity of the motion class ((X, Y, Z), [0, 1]), or None (saliency off/failed)."""
        if self.saliency != "occlusion":
            return None
        try:
            from monai.visualize import OcclusionSensitivity

            if self._cam is None:
                size = max(2, int(r["image"].shape[1]) // 6)
                self._cam = OcclusionSensitivity(
                    nn_module=self.network, mask_size=size, overlap=0.0, n_batch=8, mode="mean_img"
                )
            with torch.no_grad():
                occ, _ = self._cam(self._to_device(r["image"][None]))
            # hiding a region lowers the motion logit: the region pushes towards motion
            sal = -occ[:, self.motion_index : self.motion_index + 1]
            sal = (sal - sal.min()) / (sal.max() - sal.min()).clamp(min=1e-8)
            return sal.cpu().numpy()[0, 0]
        except Exception as err:  # noqa: BLE001 - a picture must not fail the scan
            logger.warning("occlusion sensitivity failed for %s: %s", r["path"], err)
            return None

    def _thumbnail(self, r: dict[str, Any], saliency: np.ndarray | None) -> None:
        from scripts.common.files import atomic_write
        from scripts.qc_report import render_thumbnail

        try:
            data = render_thumbnail(r["image"][0].numpy(), saliency)
            atomic_write(
                self.output_dir / "qc_thumbnails" / thumbnail_name(r["path"]), lambda tmp: tmp.write_bytes(data)
            )
        except Exception as err:  # noqa: BLE001
            logger.warning("thumbnail failed for %s: %s", r["path"], err)

    # -- recording -----------------------------------------------------------------------------
    @staticmethod
    def _failure(item: Mapping[str, Any], code: str, reason: str) -> dict[str, Any]:
        return {
            "path": item["image"],
            "participant_id": item.get("participant_id", ""),
            "session_id": item.get("session_id", ""),
            "status": code,
            "reason": reason,
            "input_space": "",
            "seconds": 0.0,
        }

    def _row(self, r: Mapping[str, Any]) -> dict[str, Any]:
        prob = r.get("prob_motion")
        scored = r["status"] in SCORED_STATUSES and prob is not None
        return {
            "participant_id": r.get("participant_id", ""),
            "session_id": r.get("session_id", ""),
            "path": r["path"],
            "status": r["status"],
            "reason": " ".join(str(r.get("reason", "")).split()),
            "prob_motion": f"{float(prob):.6f}" if scored else "",
            "decision": ("motion" if float(prob) >= self.threshold else "no_motion") if scored else "",
            "threshold": f"{self.threshold:g}",
            "input_space": r.get("input_space", ""),
            "model_sha256": self.model_sha256,
            "bundle_version": self.version,
            "seconds": f"{float(r.get('seconds', 0.0)):.3f}",
        }

    def _record(self, r: Mapping[str, Any]) -> None:
        row = self._row(r)
        self._journal_file.write(json.dumps({**row, "recorded_at": round(time.time(), 3)}) + "\n")
        self._journal_file.flush()
        os.fsync(self._journal_file.fileno())
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{Path(row['path']).name[:30]}: {row['status']}", refresh=False)
        self._new_rows += 1
        if self.world_size == 1 and self._new_rows % self.flush_every == 0:
            _write_table(self._merged(None), self.table_path)

    def _recorded(self) -> dict[str, dict[str, Any]]:
        """Rows already recorded with the current model (journals, then an existing ``qc.tsv``)."""
        done = read_journal(self.state_dir, self.model_sha256)
        if self.table_path.is_file():  # rows of an older run whose journal was removed
            for row in read_qc_table(self.table_path):
                if row.get("model_sha256") == self.model_sha256:
                    done.setdefault(row["path"], row)
        return done

    def _merged(self, items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Recorded rows (of ``items``, in their order), decisions redone with the current threshold."""
        done = self._recorded()
        rows = list(done.values()) if items is None else [done[it["image"]] for it in items if it["image"] in done]
        out = []
        for row in rows:
            row = dict(row)
            if row.get("prob_motion") not in (None, ""):
                row["decision"] = "motion" if float(row["prob_motion"]) >= self.threshold else "no_motion"
            row["threshold"] = f"{self.threshold:g}"
            out.append(row)
        return out

    def _write_outputs(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = self._merged(items)
        missing = len(items) - len(rows)
        if missing:
            logger.error("%d inputs have no row (a rank failed?); re-run to complete the table.", missing)
        _write_table(rows, self.table_path)
        if self.report:
            from scripts.qc_report import write_report

            try:
                write_report(
                    rows,
                    self.output_dir / "qc_report.html",
                    self.output_dir / "qc_thumbnails",
                    threshold=self.threshold,
                    page_size=self.report_page_size,
                )
            except Exception as err:  # noqa: BLE001 - the table is the product; the report is a view of it
                logger.error("could not write the HTML report: %s", err)
        return rows
