"""Binary classification metrics with motion as the positive class, and McNemar's test.

Every function takes plain sequences (lists, numpy arrays, tensors) of per-image values. Label 1 is
"motion" and is the positive class for sensitivity and specificity (ClinicaDL used class 0 as
positive; we do not).
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

__all__ = ["BinaryMetrics", "binary_metrics", "McNemarResult", "mcnemar"]


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of a binary classifier on one set of images (motion = positive class)."""

    n: int
    n_positive: int
    n_negative: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    balanced_accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    roc_auc: float
    threshold: float

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics as an ordered plain dictionary; undefined (NaN) values become None (JSON null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self.__dict__.items()}


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def binary_metrics(
    labels: Sequence[int] | np.ndarray,
    prob_motion: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
) -> BinaryMetrics:
    """Compute balanced accuracy, sensitivity, specificity, PPV, NPV and ROC AUC.

    Args:
        labels: true labels, 0 (no motion) or 1 (motion), one per image.
        prob_motion: predicted probability of motion, one per image, in [0, 1].
        threshold: an image is predicted "motion" when ``prob_motion >= threshold``.

    Returns:
        a :class:`BinaryMetrics`. Quantities whose denominator is zero (e.g. sensitivity when no
        image has motion, AUC when only one class is present) are NaN, never a silent 0.

    Raises:
        ValueError: if the inputs differ in length, are empty, or labels are not 0/1.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(prob_motion, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length.")
    if y.size == 0:
        raise ValueError("no predictions to evaluate.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()))}.")
    pred = (p >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    sens = _safe_div(tp, tp + fn)
    spec = _safe_div(tn, tn + fp)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else float("nan")
    return BinaryMetrics(
        n=int(y.size),
        n_positive=int(y.sum()),
        n_negative=int(y.size - y.sum()),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=_safe_div(tp + tn, y.size),
        balanced_accuracy=float(np.nanmean([sens, spec])),  # one class is always present
        sensitivity=sens,
        specificity=spec,
        ppv=_safe_div(tp, tp + fp),
        npv=_safe_div(tn, tn + fn),
        roc_auc=auc,
        threshold=float(threshold),
    )


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test of two classifiers on the same images.

    ``b``: images classifier A got right and B wrong; ``c``: A wrong and B right.
    """

    n: int
    both_correct: int
    b: int
    c: int
    both_wrong: int
    statistic: float
    p_value: float
    method: str


def mcnemar(
    labels: Sequence[int] | np.ndarray,
    pred_a: Sequence[int] | np.ndarray,
    pred_b: Sequence[int] | np.ndarray,
    exact_below: int = 25,
) -> McNemarResult:
    """McNemar's test on paired predictions of two classifiers.

    With ``b + c < exact_below`` discordant pairs the exact two-sided binomial test (p = 0.5) is used;
    otherwise the chi-squared statistic with continuity correction, ``(|b - c| - 1)^2 / (b + c)``,
    with one degree of freedom.

    Args:
        labels: true labels (0/1), one per image.
        pred_a: predicted labels of classifier A for the same images, same order.
        pred_b: predicted labels of classifier B.
        exact_below: discordant-pair count below which the exact test is used.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    a = np.asarray(pred_a).astype(np.int64).ravel() == y
    b_ok = np.asarray(pred_b).astype(np.int64).ravel() == y
    if not (a.shape == b_ok.shape == y.shape):
        raise ValueError("labels and both prediction arrays must have the same length.")
    b = int((a & ~b_ok).sum())
    c = int((~a & b_ok).sum())
    n_disc = b + c
    if n_disc == 0:
        statistic, p_value, method = 0.0, 1.0, "exact"
    elif n_disc < exact_below:
        statistic = float(min(b, c))
        p_value = float(stats.binomtest(min(b, c), n_disc, 0.5, alternative="two-sided").pvalue)
        method = "exact"
    else:
        statistic = (abs(b - c) - 1.0) ** 2 / n_disc
        p_value = float(stats.chi2.sf(statistic, df=1))
        method = "chi2_corrected"
    return McNemarResult(
        n=int(y.size),
        both_correct=int((a & b_ok).sum()),
        b=b,
        c=c,
        both_wrong=int((~a & ~b_ok).sum()),
        statistic=float(statistic),
        p_value=min(1.0, p_value),
        method=method,
    )
