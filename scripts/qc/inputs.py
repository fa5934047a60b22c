"""The QC job's inputs: the bundle's one resolver (:mod:`scripts.common.inputs`) in its lenient mode, where
anything that is not a scan still becomes an input (and gets a row with an error status)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from scripts.common.inputs import resolve_inputs

__all__ = ["collect_inputs"]


def collect_inputs(source: str | os.PathLike | Iterable[Any], datalist_key: str = "test") -> list[dict[str, Any]]:
    """Items ``{"image", "participant_id", "session_id"}`` of everything a batch QC job is pointed at.

    ``source`` may be a folder (recursive; a BIDS dataset yields its ``anat/*_T1w`` images, a CAPS tree its
    t1-linear images), a datalist JSON (split ``datalist_key``), a CSV/TSV list with an ``image`` or ``path``
    column (relative paths against its folder; every listed path becomes an item, even one that does not
    exist or is not an image: it gets an error row), one file, or a list of these (where a path that does not
    exist becomes an item). Items are de-duplicated by absolute path (first wins).

    Raises:
        FileNotFoundError: ``source`` itself does not exist (a fatal error: nothing to do).
    """
    return resolve_inputs(source, datalist_key, strict=False)
