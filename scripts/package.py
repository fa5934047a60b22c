"""Build the release zip of the bundle the way the MONAI model zoo releases bundles.

::

    python -m scripts.package                                   # weights included
    python -m scripts.package --weights_url https://.../model.pt   # + large_files.yml with sha256
    python -m scripts.package --exclude_weights --weights_url https://.../model.pt

writes ``dist/brain_t1w_motion_classification_v<version>.zip``. The version is the ``version`` of
``configs/metadata.json``, which must also be a key of its ``changelog`` (the zoo's rule). The zip
holds one folder, ``brain_t1w_motion_classification/``, with ``LICENSE``, ``configs/``, ``docs/``,
``scripts/`` (Python sources only) and ``models/model.pt``; repository-only files (``README.md``,
``tests/``, ``apps/``, requirements, CI, data and outputs) stay out, as in a zoo release.

With ``--weights_url`` a ``large_files.yml`` is added that lists ``models/model.pt`` with that URL and
the weights' sha256: ``python -m monai.bundle download_large_files`` then fetches and checks the
weights, and the bundle's loaders (``scripts.integrity``) refuse a file whose hash differs. With
``--exclude_weights`` the weights are left out and ``--weights_url`` is required (the zoo's way for
files too large to ship).

The zip is reproducible: entries are sorted, timestamps fixed to 1980-01-01 and permissions to
0644, so the same inputs give the same bytes (and the same sha256).

Serve the zip as a GitHub release asset (tag of your choice) and users get the bundle with
``python -m monai.bundle download --name brain_t1w_motion_classification --version <v>
--source github --repo <owner>/<repo>/<tag>``, or with ``--url <zip url>`` from anywhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from scripts.common.files import atomic_write
from scripts.integrity import WeightIntegrityError, expected_hash, file_hash

__all__ = ["BUNDLE_NAME", "bundle_version", "bundle_files", "zip_name", "build_package", "main"]

BUNDLE_NAME = "brain_t1w_motion_classification"
#: top-level files and folders that make up a released bundle; everything else stays in the repository.
_RELEASED_FILES = ("LICENSE",)
_RELEASED_OPTIONAL = ("models/threshold.json",)  # shipped beside the weights when present
_RELEASED_DIRS = {"configs": None, "docs": None, "scripts": (".py",)}  # folder -> allowed suffixes (None: all)
_WEIGHTS_ARCNAME = "models/model.pt"
_DEPLOY_CONFIG = "configs/inference.json"  # generated from inference.yaml for MONAI Deploy (docs/ecosystem.md)
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # earliest timestamp a zip can store


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The bundle version from ``configs/metadata.json``; it must be listed in ``changelog``.

    Raises:
        ValueError: no version, or the version has no changelog entry.
    """
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    version = meta.get("version")
    if not version or not isinstance(version, str):
        raise ValueError(f"{meta_file}: 'version' must be a non-empty string.")
    if version not in meta.get("changelog", {}):
        raise ValueError(f"{meta_file}: version {version} has no entry in 'changelog'; add one before packaging.")
    return version


def zip_name(version: str, name: str = BUNDLE_NAME) -> str:
    """The zoo's release file name, ``<name>_v<version>.zip`` (what ``monai.bundle download`` asks for)."""
    return f"{name}_v{version}.zip"


def bundle_files(bundle_root: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(source file, path inside the bundle folder)`` of every released file except weights, sorted."""
    root = Path(bundle_root)
    files = []
    for name in _RELEASED_FILES:
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is required in a bundle and is missing.")
        files.append((root / name, name))
    files += [(root / name, name) for name in _RELEASED_OPTIONAL if (root / name).is_file()]
    for folder, suffixes in _RELEASED_DIRS.items():
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            if suffixes is None or path.suffix in suffixes:
                files.append((path, rel.as_posix()))
    if not any(arc == "configs/metadata.json" for _, arc in files):
        raise FileNotFoundError(f"{root / 'configs' / 'metadata.json'} is required in a bundle and is missing.")
    return sorted(files, key=lambda item: item[1])


def _inference_json(root: Path) -> bytes:
    """``configs/inference.yaml`` as JSON: MONAI Deploy's bundle operators read ``configs/inference.json``."""
    config = yaml.safe_load((root / "configs" / "inference.yaml").read_text(encoding="utf-8"))
    return (json.dumps(config, indent=2) + "\n").encode()


def _large_files_yaml(url: str, sha256: str) -> bytes:
    spec = {"large_files": [{"path": _WEIGHTS_ARCNAME, "url": url, "hash_val": sha256, "hash_type": "sha256"}]}
    return yaml.safe_dump(spec, sort_keys=False).encode()


def _add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_FIXED_TIME)
    info.external_attr = 0o100644 << 16  # regular file, rw-r--r--
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def build_package(
    bundle_root: str | os.PathLike = ".",
    output_dir: str | os.PathLike = "dist",
    weights: str | os.PathLike | None = None,
    exclude_weights: bool = False,
    weights_url: str | None = None,
    name: str = BUNDLE_NAME,
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` and return its path.

    Args:
        bundle_root: the bundle (repository) root.
        output_dir: where the zip goes (created if needed).
        weights: the state dict to ship as ``models/model.pt``; default ``<bundle_root>/models/model.pt``.
            Without ``weights_url`` it must match the hash the bundle's own ``large_files.yml`` lists
            for ``models/model.pt`` (if any), and that file is shipped too.
        exclude_weights: leave the weights out; needs ``weights_url``.
        weights_url: where the weights can be downloaded; adds ``large_files.yml`` with their sha256.
        name: bundle name, the folder inside the zip.

    Raises:
        FileNotFoundError: the weights or a required bundle file are missing.
        ValueError: ``exclude_weights`` without ``weights_url``, or a version without changelog entry.
        WeightIntegrityError: the weights differ from the hash the bundle already publishes.
    """
    root = Path(bundle_root)
    version = bundle_version(root)
    weights = Path(weights) if weights is not None else root / _WEIGHTS_ARCNAME
    if exclude_weights and not weights_url:
        raise ValueError("--exclude_weights needs --weights_url: users must be able to download the weights.")
    if not weights.is_file():
        raise FileNotFoundError(
            f"Weights {weights} not found: train first (python -m monai.bundle run training --config_file "
            f"configs/train.yaml) or pass --weights <file>."
        )
    published = expected_hash(root / _WEIGHTS_ARCNAME, root)  # a hash in the repository's own large_files.yml
    if published and not weights_url and file_hash(weights, published[1]) != published[0]:
        raise WeightIntegrityError(
            f"{weights} does not match the {published[1]} that {published[2]} publishes for {_WEIGHTS_ARCNAME}; "
            f"pass --weights_url to publish new weights with their own hash."
        )

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            entries = {arc: src.read_bytes() for src, arc in bundle_files(root)}
            entries[_DEPLOY_CONFIG] = _inference_json(root)
            if not exclude_weights:
                entries[_WEIGHTS_ARCNAME] = weights.read_bytes()
            if weights_url:
                entries["large_files.yml"] = _large_files_yaml(weights_url, file_hash(weights, "sha256"))
            elif published:
                entries[published[2].name] = published[2].read_bytes()
            for arc in sorted(entries):
                _add(zf, f"{name}/{arc}", entries[arc])

    return atomic_write(Path(output_dir) / zip_name(version, name), write)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point (``python -m scripts.package --help``)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", default=".", help="bundle root (default: current folder)")
    parser.add_argument("--output_dir", default="dist", help="where to write the zip (default: dist)")
    parser.add_argument("--weights", default=None, help="state dict to ship (default: models/model.pt)")
    parser.add_argument("--exclude_weights", action="store_true", help="leave the weights out of the zip")
    parser.add_argument("--weights_url", default=None, help="download URL of the weights; adds large_files.yml")
    args = parser.parse_args(argv)
    out = build_package(args.bundle_root, args.output_dir, args.weights, args.exclude_weights, args.weights_url)
    print(f"{out}  sha256={file_hash(out)}")
    return out


if __name__ == "__main__":
    main()
