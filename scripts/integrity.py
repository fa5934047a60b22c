"""Weight integrity: check weight files against the hashes listed in the bundle's ``large_files.yml``.

The model zoo keeps weights out of the repository and lists them in ``large_files.yml`` (or ``.yaml``
/ ``.json``) at the bundle root::

    large_files:
      - path: models/model.pt
        url: https://.../model.pt
        hash_val: 3f1c...e9        # optional
        hash_type: sha256          # md5, sha1, sha256 or sha512

MONAI checks ``hash_val`` only while *downloading* (``python -m monai.bundle download_large_files``).
This module checks it every time the weights are *loaded*: a file that was swapped, truncated or
tampered with after download is refused with a :class:`WeightIntegrityError` naming the file and
both hashes. Files without an entry, or entries without ``hash_val``, are loaded unchecked (a
locally trained ``models/model.pt`` has no published hash).

Used by ``configs/inference.yaml`` and ``configs/evaluate.yaml`` (``VerifiedCheckpointLoader``), by
``scripts.export`` and by the MONAI Label app in ``apps/motion_classification``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

__all__ = [
    "LARGE_FILES_NAMES",
    "WeightIntegrityError",
    "file_hash",
    "find_large_files",
    "read_large_files",
    "expected_hash",
    "verify_file",
    "VerifiedCheckpointLoader",
]

logger = logging.getLogger(__name__)

#: names MONAI's ``download_large_files`` looks for at the bundle root, in this order.
LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")
_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
_CHUNK = 1 << 20  # bytes read per hashing step


class WeightIntegrityError(ValueError):
    """A weight file does not match the hash published for it in ``large_files.yml``."""


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Args:
        path: the file.
        hash_type: one of ``md5``, ``sha1``, ``sha256``, ``sha512``.
    """
    hash_type = hash_type.lower()
    if hash_type not in _HASH_TYPES:
        raise ValueError(f"Unsupported hash_type {hash_type!r}; use one of {', '.join(_HASH_TYPES)}.")
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_large_files(bundle_root: str | os.PathLike) -> Path | None:
    """The bundle's ``large_files.yml`` / ``.yaml`` / ``.json``, or None when it has none."""
    for name in LARGE_FILES_NAMES:
        candidate = Path(bundle_root) / name
        if candidate.is_file():
            return candidate
    return None


def read_large_files(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``large_files`` entries of a large-files file, validated.

    Raises:
        ValueError: the file is not a mapping with a ``large_files`` list of entries that each have
            a ``path``, or names an unsupported ``hash_type``.
    """
    path = Path(path)
    text = path.read_text()
    try:
        content = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot be parsed ({e}).") from e
    if not isinstance(content, Mapping) or not isinstance(content.get("large_files"), list):
        raise ValueError(f"{path}: expected a mapping with a 'large_files' list.")
    entries = []
    for i, entry in enumerate(content["large_files"]):
        if not isinstance(entry, Mapping) or not entry.get("path"):
            raise ValueError(f"{path}: entry {i} has no 'path'.")
        hash_val = entry.get("hash_val")
        if hash_val is not None and not isinstance(hash_val, str):  # e.g. unquoted all-digit YAML -> int
            raise ValueError(f"{path}: entry {i} ({entry['path']}) has a hash_val that is not a string; quote it.")
        hash_type = str(entry.get("hash_type") or "md5").lower()  # MONAI's default hash type is md5
        if entry.get("hash_val") and hash_type not in _HASH_TYPES:
            raise ValueError(f"{path}: entry {i} ({entry['path']}) has unsupported hash_type {hash_type!r}.")
        entries.append({**entry, "hash_type": hash_type})
    return entries


def expected_hash(file: str | os.PathLike, bundle_root: str | os.PathLike) -> tuple[str, str, Path] | None:
    """``(hash_val, hash_type, large_files_path)`` published for ``file``, or None when there is none.

    ``file`` matches an entry when both resolve to the same location under ``bundle_root``.
    """
    large_files = find_large_files(bundle_root)
    if large_files is None:
        return None
    target = Path(file).resolve()
    for entry in read_large_files(large_files):
        if (Path(bundle_root) / entry["path"]).resolve() == target:
            if entry.get("hash_val"):
                return str(entry["hash_val"]).lower(), entry["hash_type"], large_files
            return None
    return None


def verify_file(file: str | os.PathLike, bundle_root: str | os.PathLike) -> bool:
    """Check ``file`` against the hash that ``<bundle_root>/large_files.yml`` publishes for it.

    Returns:
        True when a hash was published and matches, False when none was published (nothing to check).

    Raises:
        FileNotFoundError: the file does not exist.
        WeightIntegrityError: a hash was published and the file's hash differs.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"Weight file {file} does not exist.")
    expected = expected_hash(file, bundle_root)
    if expected is None:
        logger.debug("No published hash for %s; loading it unchecked.", file)
        return False
    hash_val, hash_type, source = expected
    actual = file_hash(file, hash_type)
    if actual != hash_val:
        raise WeightIntegrityError(
            f"Weight file {file} failed its integrity check: {hash_type} is {actual}, but {source} "
            f"expects {hash_val}. The file is corrupted, was replaced, or belongs to another version; "
            f"download it again (python -m monai.bundle download_large_files --bundle_path <bundle>) "
            f"or remove the hash from {source.name} if you replaced the weights on purpose."
        )
    logger.info("Weight file %s matches its published %s.", file, hash_type)
    return True


class VerifiedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that first checks the file against ``large_files.yml``.

    Args:
        load_path: the checkpoint file.
        load_dict: objects to restore, e.g. ``{"model": network}``.
        bundle_root: the bundle root holding ``large_files.yml``; a bundle without one (or without
            a hash for ``load_path``) loads unchecked.
        kwargs: any other argument of ``monai.handlers.CheckpointLoader`` (``map_location``,
            ``strict``, ``name``, ...).
    """

    def __init__(self, load_path: str, load_dict: dict, bundle_root: str | os.PathLike = ".", **kwargs: Any) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        self.bundle_root = bundle_root

    def __call__(self, engine: Engine) -> None:
        """Verify the file, then load it into ``load_dict`` (raises :class:`WeightIntegrityError`)."""
        verify_file(self.load_path, self.bundle_root)
        super().__call__(engine)
