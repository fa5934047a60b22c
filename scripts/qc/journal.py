"""The QC job's records: the append-only journal (one JSON line per scan, flushed and fsynced), its repair
after a torn write, the attempts log (crash isolation), the lock on an output folder, and ``qc.tsv``."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.common.files import write_rows_atomic

__all__ = [
    "TSV_COLUMNS",
    "ATTEMPTS",
    "JOURNAL",
    "read_jsonl",
    "lock_output",
    "repair_journal",
    "read_journal",
    "read_qc_table",
    "write_table",
]

logger = logging.getLogger(__name__)

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
#: File names (in ``<output_dir>/.qc``) of a rank's attempts log and journal.
ATTEMPTS = "attempts-rank{rank}.jsonl"
JOURNAL = "journal-rank{rank}.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def lock_output(state_dir: Path, rank: int) -> Any:
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


def repair_journal(path: Path) -> None:
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
        for record in read_jsonl(journal):
            if model_sha256 is None or record.get("model_sha256") == model_sha256:
                rows.setdefault(record["path"], record)
    return rows


def read_qc_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``qc.tsv`` (paths that are not UTF-8 come back as the same ``str`` they were written from)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    # a file name that is not UTF-8 (os.listdir gives it surrogate escapes) is written as its own bytes
    write_rows_atomic(rows, path, TSV_COLUMNS, delimiter="\t", errors="surrogateescape")
