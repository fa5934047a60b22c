"""What a job is pointed at, turned into scans: the one input resolver of the bundle.

Used by the QC job (:mod:`scripts.qc`), inference datalists (:func:`scripts.datalist.resolve_inputs`) and
batch preprocessing (:func:`scripts.preprocessing.find_scans`), so that the three agree on what a scan is.

A *source* is one of:

- a folder, laid out as
    - **BIDS** (``sub-*`` folders holding ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``): those images;
    - **CAPS** (a ``subjects/`` folder holding ``subjects/sub-*/ses-*/t1_linear/*_T1w.nii[.gz]``,
      the output of Clinica's t1-linear or :mod:`scripts.preprocessing`): those images;
    - anything else: every volume file (:data:`VOLUME_SUFFIXES`) and every folder holding a DICOM
      series, recursively, sorted. Symbolic links to folders are followed once; a link back into a
      folder already walked (a loop) is skipped. An Analyze pair (``.hdr`` + ``.img``) is one scan;
  a folder that is itself a DICOM series is one scan;
- a datalist JSON (the items of one split, relative paths against the file's folder);
- a CSV/TSV list with an ``image`` or ``path`` column (a spreadsheet's byte-order mark is ignored;
  relative paths against the list's folder; the other columns are kept);
- one file;
- an item (a mapping with ``image``; a remote input such as ``dicomweb:https://...`` is kept as it is);
- a list of these.

Every item gets ``image`` (an absolute path) and ``participant_id``/``session_id`` (from the item,
else BIDS/CAPS entities of the path, else empty). Items are de-duplicated by path (first wins).

Two modes: ``strict`` (inference, preprocessing) raises on anything that is not a scan; lenient (the
QC job) keeps it as an item, so that it gets a row with an error status.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "VOLUME_SUFFIXES",
    "IMAGE_SUFFIXES",
    "has_suffix",
    "strip_suffix",
    "is_volume_file",
    "has_dicom_magic",
    "is_dicom_series_folder",
    "bids_entities",
    "entity_label",
    "load_datalist",
    "find_scan_paths",
    "resolve_inputs",
]

logger = logging.getLogger(__name__)

#: File suffixes read as one volume (NIfTI, Analyze, MetaImage, NRRD).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".img", ".hdr", ".mha", ".mhd", ".nrrd", ".nhdr")
#: Everything a scan path may end with (a ``.dcm`` file is a one-file DICOM series).
IMAGE_SUFFIXES = VOLUME_SUFFIXES + (".dcm",)
_ENTITY = re.compile(r"(sub|ses)-([A-Za-z0-9]+)")


def has_suffix(name: str, suffixes: Iterable[str]) -> bool:
    """Whether ``name`` ends with one of ``suffixes`` (case-insensitive)."""
    return name.lower().endswith(tuple(suffixes))


def strip_suffix(name: str) -> str:
    """``name`` without its volume suffix (``a.nii.gz`` -> ``a``); other names unchanged."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_volume_file(path: str | os.PathLike) -> bool:
    """Whether a file name looks like one volume (:data:`VOLUME_SUFFIXES`; hidden files are not)."""
    name = Path(path).name
    return has_suffix(name, VOLUME_SUFFIXES) and not name.startswith(".")


def has_dicom_magic(path: Path) -> bool:
    """A regular file with DICOM's ``DICM`` marker at byte 128 (FIFOs and devices are never opened)."""
    try:
        if not path.is_file():  # regular files only: opening a FIFO would block
            return False
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series_folder(folder: Path, has_subfolders: bool | None = None) -> bool:
    """A folder holding a DICOM series: a file with the DICOM marker or a ``.dcm`` file (other files or
    sub-folders beside it, e.g. ``notes.txt``, do not matter), or, for files without the marker (old
    ACR-NEMA exports), a leaf folder whose visible files all have DICOM-like names (:func:`_dicom_like_name`)."""
    try:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    except OSError:
        return False
    files = sorted(e for e in entries if e.is_file())
    if any(f.suffix.lower() == ".dcm" or has_dicom_magic(f) for f in files):
        return True
    if has_subfolders is None:
        has_subfolders = any(e.is_dir() for e in entries)
    return not has_subfolders and bool(files) and all(_dicom_like_name(f.name) for f in files)


def _dicom_like_name(name: str) -> bool:
    """A file name a DICOM export may use without the marker: no extension, ``.dcm``/``.ima``, or a
    numeric one (``IM0001.1``, UIDs such as ``1.2.840.113619.2.55``)."""
    suffix = Path(name).suffix.lower()
    return suffix in ("", ".dcm", ".ima") or suffix[1:].isdigit()


def entity_label(text: str) -> str:
    """``text`` reduced to what a BIDS label may hold, letters and digits (``site_a/p-7`` -> ``siteap7``);
    "" when nothing is left."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def bids_entities(path: str | os.PathLike) -> dict[str, str]:
    """``participant_id`` and ``session_id`` read from BIDS/CAPS names (``sub-X``, ``ses-Y``) in a path.

    The file name wins over folder names; missing entities are empty strings.
    """
    found: dict[str, str] = {}
    for part in Path(path).parts:  # later parts (the file name) override folders
        for key, value in _ENTITY.findall(part):
            found[key] = f"{key}-{value}"
    return {"participant_id": found.get("sub", ""), "session_id": found.get("ses", "")}


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict[str, Any]]:
    """Items of split ``key`` of a datalist JSON file, with image paths made absolute.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON, lacks the split, or an item lacks ``image``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist.")
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(content, dict) or key not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"datalist {path} has no '{key}' list (it has {found}).")
    items = []
    for i, item in enumerate(content[key]):
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"datalist {path}: item {i} of '{key}' has no 'image'.")
        item = dict(item)
        image = Path(os.path.expanduser(str(item["image"])))
        item["image"] = str(image if image.is_absolute() else (path.parent / image))
        items.append(item)
    return items


def _layout_scans(root: Path) -> tuple[str, list[Path]] | None:
    """BIDS or CAPS images of ``root``, or None when ``root`` is neither."""
    nifti = (".nii", ".nii.gz")
    if any(p.is_dir() for p in root.glob("sub-*")):
        found = sorted(
            p
            for pattern in ("sub-*/anat/*_T1w.*", "sub-*/ses-*/anat/*_T1w.*")
            for p in root.glob(pattern)
            if has_suffix(p.name, nifti)
        )
        if found:
            return "bids", found
    if (root / "subjects").is_dir():
        found = sorted(p for p in root.glob("subjects/sub-*/ses-*/t1_linear/*_T1w.*") if has_suffix(p.name, nifti))
        if found:
            return "caps", found
    return None


def find_scan_paths(root: str | os.PathLike) -> tuple[str, list[Path]]:
    """``(layout, scans)`` of a folder: layout ``"bids"``, ``"caps"``, ``"dicom"`` (``root`` is one DICOM
    series) or ``"folder"`` (a recursive search; see the module's documentation)."""
    root = Path(root)
    layout = _layout_scans(root)
    if layout is not None:
        return layout
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
        volumes = [here / f for f in sorted(filenames) if is_volume_file(f)]
        # an Analyze pair is one scan: its .img is read through the .hdr
        headers = {v.with_suffix("").name for v in volumes if v.suffix.lower() == ".hdr"}
        volumes = [v for v in volumes if not (v.suffix.lower() == ".img" and v.with_suffix("").name in headers)]
        if not volumes and is_dicom_series_folder(here, bool(dirnames)):
            if here == root:
                return "dicom", [root]
            out.append(here)
        out.extend(volumes)
    return "folder", out


def _list_items(path: Path, strict: bool) -> list[dict[str, Any]]:
    """Items of a CSV/TSV list (see :func:`resolve_inputs`)."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not a column
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    column = next((c for c in ("image", "path") if rows and c in rows[0]), None)
    if column is None and (rows or strict):
        raise ValueError(f"{path} needs an 'image' or 'path' column.")
    items = []
    for line, row in enumerate(rows, start=2):
        cell = (row.pop(column) or "").strip()
        row = {k: v for k, v in row.items() if isinstance(k, str) and v is not None}  # short/long lines
        if not cell:
            if strict:
                raise ValueError(f"{path} line {line}: empty '{column}' cell.")
            items.append({**row, "image": f"{path} line {line}: empty '{column}' cell"})  # gets a not_found row
            continue
        image = Path(os.path.expanduser(cell))
        items.append({**row, "image": str(image if image.is_absolute() else path.parent / image)})
    return items


def _is_uri(path: str) -> bool:
    """A remote input (``dicomweb:https://...``), kept as it is (never made an absolute local path)."""
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:(//|[a-z]+://)", path))


def _source_items(source: Any, datalist_key: str, strict: bool, top: bool) -> list[dict[str, Any]]:
    if isinstance(source, Mapping):  # an item already (e.g. a PACS series from scripts.pacs.series_items)
        if "image" not in source:
            raise ValueError(f"input item {dict(source)!r} has no 'image'.")
        return [dict(source)]
    if not isinstance(source, (str, os.PathLike)):
        return [it for s in source for it in _source_items(s, datalist_key, strict, top=False)]
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        if top or strict:
            raise FileNotFoundError(f"input {path} does not exist.")
        return [{"image": str(path)}]  # in a lenient list, a missing path is an input (a not_found row)
    if path.is_dir():
        _, scans = find_scan_paths(path)
        if not scans:
            message = f"folder {path} contains no .nii, .nii.gz, MetaImage, NRRD or Analyze file and no DICOM series."
            if strict:
                raise ValueError(message)
            logger.warning(message)
        return [{"image": str(p)} for p in scans]
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_datalist(path, datalist_key)
    if suffix in (".csv", ".tsv"):
        return _list_items(path, strict)
    if strict and not has_suffix(path.name, IMAGE_SUFFIXES):
        raise ValueError(
            f"{path} is not a datalist (.json), a list (.csv/.tsv), a folder or an image ({', '.join(IMAGE_SUFFIXES)})."
        )
    return [{"image": str(path)}]


def resolve_inputs(source: Any, datalist_key: str = "test", strict: bool = True) -> list[dict[str, Any]]:
    """Items ``{"image", "participant_id", "session_id", ...}`` of everything ``source`` points at.

    Args:
        source: a folder, datalist JSON, CSV/TSV list, file, or a list of these (module documentation).
        datalist_key: split of a datalist JSON.
        strict: raise on anything that is not a scan (a missing path, an empty folder, an unknown file type,
            an empty list cell); False: keep those as items (the QC job gives each an error row). Either way
            a top-level ``source`` that does not exist raises.

    Raises:
        FileNotFoundError: ``source`` (or, when strict, any listed path) does not exist.
        ValueError: (strict) nothing usable at a path; a CSV/TSV list without an ``image``/``path`` column.
    """
    items = _source_items(source, datalist_key, bool(strict), top=isinstance(source, (str, os.PathLike)))
    seen: set[str] = set()
    out = []
    for item in items:
        key = str(item["image"]) if _is_uri(str(item["image"])) else os.path.abspath(str(item["image"]))
        if key in seen:
            logger.warning("input %s is listed twice; used once.", key)
            continue
        seen.add(key)
        entities = bids_entities(key)
        out.append({**item, "image": key, **{k: item.get(k) or v for k, v in entities.items()}})
    return out
