"""One status vocabulary (scripts/common/statuses.py) for preprocessing and the QC job."""

from __future__ import annotations

import pytest

from conftest import BUNDLE_ROOT

from scripts.common.statuses import SCORED_STATUSES, STATUSES, statuses
from scripts.preprocessing import ERROR_CODES
from scripts.qc import QC_STATUSES


def test_every_job_uses_the_shared_words():
    for subset in (QC_STATUSES, ERROR_CODES):
        assert subset and all(STATUSES[code] == text for code, text in subset.items())
    assert set(SCORED_STATUSES) <= set(QC_STATUSES)
    shared = set(QC_STATUSES) & set(ERROR_CODES)  # a preprocessing failure keeps its code in qc.tsv
    assert {"unreadable", "not_3d", "registration_diverged", "dicom_missing_slice"} <= shared


def test_every_qc_status_is_documented():
    doc = (BUNDLE_ROOT / "docs" / "qc.md").read_text(encoding="utf-8")
    missing = [code for code in QC_STATUSES if f"`{code}`" not in doc]
    assert not missing


def test_unknown_codes_are_refused():
    with pytest.raises(KeyError, match="unknown status codes"):
        statuses("ok", "teapot")
