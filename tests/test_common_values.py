"""Option values from the command line (scripts/common/values.py)."""

from __future__ import annotations

import pytest

from scripts.common.values import as_bool, as_probability, as_seconds


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("false", False),
        ("False", False),
        (" TRUE ", True),
        ("no", False),
        ("yes", True),
        ("off", False),
        ("on", True),
        ("1", True),
        ("0", False),
    ],
)
def test_as_bool(value, expected):
    assert as_bool(value, "opt") is expected


@pytest.mark.parametrize("value", ["flase", 2, None, 0.5, "maybe"])
def test_as_bool_refuses(value):
    with pytest.raises(ValueError, match="opt must be true or false"):
        as_bool(value, "opt")


def test_as_probability():
    assert as_probability("0.25", "t") == 0.25 and as_probability(1, "t") == 1.0 and as_probability(0.0, "t") == 0.0
    for bad in (True, False, 1.5, -1e-9, float("nan"), float("inf"), "nan", "x", None, [0.5]):
        with pytest.raises(ValueError, match="t must be a number in"):
            as_probability(bad, "t")


def test_as_seconds():
    assert as_seconds("600", "t") == 600.0 and as_seconds(2.5, "t") == 2.5
    for off in (None, 0, "0", "null", "none", ""):
        assert as_seconds(off, "t") is None
    for bad in (True, "abc", float("nan"), float("inf"), -1, [3]):
        with pytest.raises(ValueError, match="t must be a number of seconds"):
            as_seconds(bad, "t")
