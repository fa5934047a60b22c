"""Loading one scan for the QC job, in a worker process: checks, reading, t1-linear space, brain gates,
normalisation. Never raises: every failure becomes a status (:mod:`scripts.qc.errors`).

NIfTI files (what training reads: t1-linear outputs) are read by the config's own load transforms
(``read_transforms`` of ``configs/inference.yaml``, the same as ``configs/train.yaml``'s), after checks on
their header and bytes; DICOM series, MetaImage, NRRD and Analyze files, which training never sees, by
SimpleITK with the DICOM slice checks of :func:`scripts.preprocessing.io.read_image`. Raw scans then go
through T1Linear preprocessing; the config's intensity normalisation comes last.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.common.grid import T1_LINEAR_ORIGIN, grid_voxel, t1_linear_grid
from scripts.common.inputs import IMAGE_SUFFIXES, has_suffix

from .errors import QC_STATUSES, QCError

__all__ = ["ScanLoader", "default_read_transforms"]


def _refuse_special_files(p: Path) -> None:
    """Raise ``unreadable`` when reading ``p`` would open something that is not a regular file: ``p``
    itself, the data file of an Analyze pair or a MetaImage header, or any file of a DICOM folder. A FIFO
    (or a device, or a socket) blocks the C readers of ITK and GDCM, where no time limit can stop them."""
    candidates = [p]
    if p.is_dir():
        candidates = [f for f in p.rglob("*") if not f.is_dir()]
    elif has_suffix(p.name, (".hdr", ".img")):
        candidates.append(p.with_suffix(".img" if p.suffix.lower() == ".hdr" else ".hdr"))
    elif has_suffix(p.name, (".mhd", ".nhdr")) and p.is_file():
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


def _check_nifti_header(path: Path) -> None:
    """The checks of a NIfTI file that need only its header and its bytes (before any voxel is allocated):
    3D (or 4D with one volume), real-valued, as many bytes as declared, an intact gzip stream."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            extra = f" with {shape[3]} volumes" if len(shape) == 4 else ""
            raise QCError("not_3d", f"{len(shape)}D image{extra} (shape {tuple(img.shape)})")
        _check_nifti_bytes(path, img)
    except QCError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for corrupt files
        raise QCError("unreadable", f"not a readable NIfTI file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def default_read_transforms() -> list[Callable]:
    """The load transforms of ``configs/train.yaml`` and ``configs/inference.yaml`` (``read_transforms``):
    MONAI's LoadImaged (channel first), Orientationd to RAS, EnsureTyped float32. Used when a
    :class:`ScanLoader` is built in Python without the config's own; a test binds the two."""
    from monai.transforms import EnsureTyped, LoadImaged, Orientationd

    return [
        LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        EnsureTyped(keys="image", dtype=torch.float32),
    ]


class ScanLoader:
    """Turn one input item into a normalised t1-linear-space tensor, or an error record; never raises.

    Called in worker processes. Returns ``{"path", "participant_id", "session_id", "status",
    "reason", "input_space", "seconds", "image"}`` where ``image`` is a (1, X, Y, Z) float32 tensor
    (normalised) for scored statuses and absent otherwise.

    Args:
        spatial_size: the network's input grid (169x208x179 at 1 mm; smaller grids sample the same box).
        normalize: callable on ``{"image": MetaTensor}`` (the config's intensity normalisation).
        read: callable turning ``{"image": path}`` of a NIfTI file into ``{"image": (1, X, Y, Z) MetaTensor}``
            in RAS orientation: the config's load transforms (``read_transforms``); None:
            :func:`default_read_transforms`.
        fetch: where remote inputs come from: an object with ``handles(path) -> bool`` and
            ``download(path, folder) -> number of files`` (:class:`scripts.pacs.DicomWebSource`); None: local
            files only. A remote series is downloaded into a temporary folder under ``download_dir`` (None:
            the system's), read as a DICOM folder, and removed.
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
        read: Callable[[dict], dict] | None = None,
        fetch: Any = None,
        download_dir: str | os.PathLike | None = None,
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
        self.read = read
        self.fetch = fetch
        self.download_dir = str(download_dir) if download_dir else None
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
        if item.get("qc_status"):  # decided before loading (e.g. a PACS series that is not a 3D T1w)
            code = str(item["qc_status"])
            out.update(status=code if code in QC_STATUSES else "internal_error", reason=str(item.get("qc_reason", "")))
            out["seconds"] = time.perf_counter() - start
            return out
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
            record = {
                "path": path,
                "isolated": self.isolated,
                "in_worker": self.in_worker,
                "pid": os.getpid(),
                "started": round(time.time(), 3),
            }
            line = json.dumps(record) + "\n"
            with open(self.attempts_path, "a") as f:
                f.write(line)

    # -- steps ---------------------------------------------------------------------------------
    def load(self, path: str) -> tuple[torch.Tensor, str, list[str]]:
        """(normalised (1, X, Y, Z) tensor, ``"t1_linear"`` or ``"raw"``, warnings); raises QCError."""
        if self.fetch is not None and self.fetch.handles(path):
            return self._load_remote(path)
        return self._load_local(path)

    def _load_remote(self, uri: str) -> tuple[torch.Tensor, str, list[str]]:
        """Download a remote series into a temporary folder (removed afterwards), then load it as a DICOM folder."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qc-series-", dir=self.download_dir) as folder:
            try:
                count = self.fetch.download(uri, folder)
            except OverflowError as err:
                raise QCError("unsupported_format", str(err)) from None
            except Exception as err:  # noqa: BLE001 - HTTP and DICOM errors of many types
                raise QCError("unreadable", f"download failed ({_first_line(err)})") from None
            if count == 0:
                raise QCError("empty_folder", "the series holds no instance")
            return self._load_local(folder)

    def _load_local(self, path: str) -> tuple[torch.Tensor, str, list[str]]:
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
            if not has_suffix(p.name, IMAGE_SUFFIXES):
                raise QCError(
                    "unsupported_format",
                    f"extension {''.join(p.suffixes) or '(none)'} is not one of {', '.join(IMAGE_SUFFIXES)} "
                    "(or a DICOM series folder)",
                )
        if p.is_file() and has_suffix(p.name, (".nii", ".nii.gz")):
            image = self._read_nifti(p)
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

    def _read_nifti(self, path: Path) -> Any:
        """A NIfTI file read by the config's load transforms (as training reads it), as a RAS ITK image.

        Raises :class:`QCError` (``unreadable``, ``not_3d``, ``non_finite``) or ``PreprocessingError``
        (``too_small``, ``not_3d`` for a single slice).
        """
        from scripts.preprocessing.io import _check_geometry, image_from_array

        _check_nifti_header(path)
        if self.read is None:
            from monai.transforms import Compose

            self.read = Compose(default_read_transforms())
        try:
            tensor = self.read({"image": str(path)})["image"]
        except Exception as err:  # noqa: BLE001 - readers raise many types for corrupt files
            cause = err.__cause__ or err  # MONAI's Compose wraps the reader's error
            raise QCError("unreadable", f"not a readable NIfTI file ({_first_line(cause)})") from None
        data = np.asarray(torch.as_tensor(tensor)[0], dtype=np.float32)
        finite = np.isfinite(data)
        if not finite.all():
            raise QCError("non_finite", f"{int((~finite).sum())} NaN or infinite voxels")
        image = image_from_array(data, np.asarray(tensor.affine, dtype=np.float64))
        _check_geometry(image, path)
        return image

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
