"""Binary classification metrics with motion as the positive class, and McNemar's test.

Every function takes plain sequences (lists, numpy arrays, tensors) of per-image values. Label 1 is
"motion" and is the positive class for sensitivity and specificity (ClinicaDL used class 0 as
positive; we do not).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from scripts.common.files import atomic_write, write_json_atomic, write_rows_atomic

__all__ = [
    "BinaryMetrics",
    "binary_metrics",
    "McNemarResult",
    "mcnemar",
    "BOOTSTRAP_METRICS",
    "bootstrap_ci",
    "expected_calibration_error",
    "choose_threshold",
    "save_roc_plot",
    "read_predictions",
    "mcnemar_files",
    "write_threshold",
    "read_threshold",
    "evaluation_statistics",
    "summarise_folds",
]


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


def _as_arrays(labels: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (int64, 0/1) and probabilities (float64) as flat arrays, checked."""
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length.")
    if y.size == 0:
        raise ValueError("no predictions to evaluate.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()))}.")
    return y, p


def binary_metrics(
    labels: Sequence[int] | np.ndarray, prob_motion: Sequence[float] | np.ndarray, threshold: float = 0.5
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
    y, p = _as_arrays(labels, prob_motion)
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


#: metrics given bootstrap confidence intervals.
BOOTSTRAP_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc")


def bootstrap_ci(
    labels: Sequence[int] | np.ndarray,
    prob_motion: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
) -> dict[str, dict[str, float | None]]:
    """Percentile bootstrap confidence intervals of binary metrics.

    Images (or, with ``groups``, whole participants: a cluster bootstrap) are resampled with
    replacement ``n_bootstrap`` times; each metric's interval is the ``(1 - confidence)/2`` and
    ``(1 + confidence)/2`` quantiles of its resampled values, ignoring resamples where it is
    undefined (e.g. AUC with one class).

    Returns:
        ``{metric: {"estimate", "low", "high", "n_valid"}}``; undefined values are None.
    """
    y, p = _as_arrays(labels, prob_motion)
    point = binary_metrics(y, p, threshold).as_dict()
    rng = np.random.RandomState(seed)
    if groups is not None:
        g = np.asarray([str(v) for v in groups])
        if g.size != y.size:
            raise ValueError("groups must have one entry per image.")
        uniq, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(uniq.size)]
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(int(n_bootstrap)):
        if groups is None:
            idx = rng.randint(0, y.size, size=y.size)
        else:
            idx = np.concatenate([members[k] for k in rng.randint(0, len(members), size=len(members))])
        yb, pb = y[idx], p[idx]
        pred = pb >= threshold
        tp, fn = int((pred & (yb == 1)).sum()), int((~pred & (yb == 1)).sum())
        tn, fp = int((~pred & (yb == 0)).sum()), int((pred & (yb == 0)).sum())
        sens, spec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
        sample = {
            "sensitivity": sens,
            "specificity": spec,
            "balanced_accuracy": float(np.nanmean([sens, spec])),
            "accuracy": _safe_div(tp + tn, yb.size),
            "roc_auc": (
                float(roc_auc_score(yb, pb)) if "roc_auc" in metrics and 0 < yb.sum() < yb.size else float("nan")
            ),
        }
        for m in metrics:
            if not math.isnan(sample[m]):
                values[m].append(sample[m])
    lo_q, hi_q = 50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)
    out: dict[str, dict[str, float | None]] = {}
    for m in metrics:
        v = np.asarray(values[m])
        out[m] = {
            "estimate": point.get(m),
            "low": float(np.percentile(v, lo_q)) if v.size else None,
            "high": float(np.percentile(v, hi_q)) if v.size else None,
            "n_valid": int(v.size),
        }
    return out


def expected_calibration_error(
    labels: Sequence[int] | np.ndarray, prob_motion: Sequence[float] | np.ndarray, n_bins: int = 10
) -> float:
    """Expected calibration error of the motion probability.

    The probabilities are binned in ``n_bins`` equal-width bins on [0, 1] (the last bin includes 1);
    ECE = sum over bins of (bin size / n) * |fraction of motion images in the bin - mean probability
    in the bin|.
    """
    y, p = _as_arrays(labels, prob_motion)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.sum() / y.size * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def choose_threshold(
    labels: Sequence[int] | np.ndarray,
    prob_motion: Sequence[float] | np.ndarray,
    method: str = "youden",
    target_specificity: float = 0.9,
) -> dict[str, float | str]:
    """Pick a decision threshold on the motion probability from labelled predictions.

    ``"youden"``: the ROC point maximising sensitivity + specificity - 1. ``"specificity"``: the
    lowest threshold whose specificity is at least ``target_specificity`` (the highest sensitivity
    at that specificity). Choose it on validation data, apply it to test data.

    Returns:
        ``{"threshold", "method", "sensitivity", "specificity"}`` at the chosen threshold.
    """
    y, p = _as_arrays(labels, prob_motion)
    if not 0 < y.sum() < y.size:
        raise ValueError("choosing a threshold needs both classes among the labels.")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is +inf (nothing positive)
    if method == "youden":
        k = int(np.argmax(tpr - fpr))
    elif method == "specificity":
        ok = np.flatnonzero(1.0 - fpr >= target_specificity)
        k = int(ok[np.argmax(tpr[ok])])
    else:
        raise ValueError(f"method must be 'youden' or 'specificity', got {method!r}.")
    result: dict[str, float | str] = {
        "threshold": float(thr[k]),
        "method": method,
        "sensitivity": float(tpr[k]),
        "specificity": float(1.0 - fpr[k]),
    }
    if method == "specificity":
        result["target_specificity"] = float(target_specificity)
    return result


def save_roc_plot(
    labels: Sequence[int] | np.ndarray,
    prob_motion: Sequence[float] | np.ndarray,
    path: str | os.PathLike,
    title: str = "ROC (motion positive)",
    threshold: float | None = None,
) -> Path | None:
    """Draw the ROC curve to a PNG (with the AUC and, optionally, the operating point of ``threshold``).

    Returns the path, or None when only one class is present (no curve exists).
    """
    y, p = _as_arrays(labels, prob_motion)
    if not 0 < y.sum() < y.size:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc_score(y, p):.3f} (n = {y.size})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    if threshold is not None:
        m = binary_metrics(y, p, threshold)
        ax.plot([1 - m.specificity], [m.sensitivity], "o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, fig.savefig)  # the temporary name ends in .png: savefig picks the format
    finally:
        plt.close(fig)


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a predictions.csv (``image, participant_id, session_id, label, prob_motion, prediction``) keyed by image.

    Raises:
        FileNotFoundError: no file. ValueError: a column is missing, or an image appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image", "label", "prob_motion", "prediction") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}.")
        rows: dict[str, dict[str, Any]] = {}
        for row in reader:
            if row["image"] in rows:
                raise ValueError(f"{path}: image {row['image']} appears twice.")
            rows[row["image"]] = {
                **row,
                "label": int(row["label"]),
                "prob_motion": float(row["prob_motion"]),
                "prediction": int(row["prediction"]),
            }
    return rows


def mcnemar_files(
    predictions_a: str | os.PathLike,
    predictions_b: str | os.PathLike,
    output: str | os.PathLike | None = None,
    exact_below: int = 25,
) -> dict[str, Any]:
    """McNemar's test between two predictions.csv files on the same images (joined on ``image``).

    Both files must hold the same images with the same labels. The result (with the file names and
    each classifier's accuracy) is returned and, with ``output``, written as JSON.
    """
    a, b = read_predictions(predictions_a), read_predictions(predictions_b)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"{predictions_a} and {predictions_b} do not hold the same images "
            f"({len(only_a)} only in the first, e.g. {only_a[:2]}; {len(only_b)} only in the second, e.g. {only_b[:2]})."
        )
    images = sorted(a)
    differ = [im for im in images if a[im]["label"] != b[im]["label"]]
    if differ:
        raise ValueError(
            f"{predictions_a} and {predictions_b} disagree on the labels of {len(differ)} images, e.g. {differ[0]}."
        )
    labels = [a[im]["label"] for im in images]
    res = mcnemar(labels, [a[im]["prediction"] for im in images], [b[im]["prediction"] for im in images], exact_below)
    out = {
        "predictions_a": str(predictions_a),
        "predictions_b": str(predictions_b),
        "accuracy_a": (res.both_correct + res.b) / res.n,
        "accuracy_b": (res.both_correct + res.c) / res.n,
        **res.__dict__,
    }
    if output:
        write_json_atomic(out, output)
    return out


def write_threshold(selection: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Save a threshold choice (:func:`choose_threshold`) as JSON where inference can read it."""
    return write_json_atomic(dict(selection), path)


def read_threshold(path: str | os.PathLike | None, default: float = 0.5) -> float:
    """The ``threshold`` saved by :func:`write_threshold`, or ``default`` when ``path`` is None or empty.

    Use in a config: ``threshold: "$scripts.metrics.read_threshold('eval/.../threshold.json')"``.
    """
    from scripts.common.values import as_probability

    default = as_probability(default, "default_threshold")  # checked even when a file wins
    if not path:
        return default
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"threshold file {path} does not exist (written by configs/evaluate.yaml).")
    data = json.loads(path.read_text())
    value = data.get("threshold") if isinstance(data, dict) else None
    if isinstance(value, str):  # a number written as text is as wrong as a boolean here
        raise ValueError(f"{path}: 'threshold' must be a number in [0, 1], got {value!r}.")
    return as_probability(value, f"{path}: 'threshold'")


def evaluation_statistics(
    labels: Sequence[int] | np.ndarray,
    prob_motion: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
    n_bins: int = 10,
    threshold_method: str = "youden",
    target_specificity: float = 0.9,
) -> dict[str, Any]:
    """Bootstrap CIs, ECE and a threshold choice for one prediction set (the ``statistics.json`` of evaluation)."""
    y, p = _as_arrays(labels, prob_motion)
    stats_out: dict[str, Any] = {
        "n": int(y.size),
        "threshold": float(threshold),
        "confidence": float(confidence),
        "n_bootstrap": int(n_bootstrap),
        "bootstrap_unit": "participant" if groups is not None else "image",
        "ci": bootstrap_ci(y, p, threshold, n_bootstrap, confidence, seed, groups),
        "ece": expected_calibration_error(y, p, n_bins),
        "ece_bins": int(n_bins),
    }
    try:
        stats_out["threshold_selection"] = choose_threshold(y, p, threshold_method, target_specificity)
    except ValueError:
        stats_out["threshold_selection"] = None
    return stats_out


def summarise_folds(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Mean ± standard deviation (ddof 1) of per-fold metrics, per evaluated split (Table II).

    Args:
        rows: one dict per (fold, split) with ``fold``, ``split`` and metric values (None allowed).
        output_dir: when given, writes ``cv_folds.csv`` (the rows) and ``cv_summary.json`` there.
    """
    metric_names = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc", "accuracy", "ece")
    summary: dict[str, Any] = {}
    for split in sorted({str(r["split"]) for r in rows}):
        sel = [r for r in rows if str(r["split"]) == split]
        entry: dict[str, Any] = {"n_folds": len(sel)}
        for m in metric_names:
            v = np.array([r[m] for r in sel if r.get(m) is not None], dtype=np.float64)
            entry[m] = {
                "mean": float(v.mean()) if v.size else None,
                "std": float(v.std(ddof=1)) if v.size > 1 else None,
                "n": int(v.size),
                "text": f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}" if v.size > 1 else None,
            }
        summary[split] = entry
    if output_dir is not None:
        out = Path(output_dir)
        write_rows_atomic(rows, out / "cv_folds.csv", ["fold", "split", "n", *metric_names])
        write_json_atomic(summary, out / "cv_summary.json")
    return summary


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="McNemar's test between two predictions.csv files.")
    parser.add_argument("predictions_a")
    parser.add_argument("predictions_b")
    parser.add_argument("--output", default=None, help="JSON file to write")
    parser.add_argument("--exact-below", type=int, default=25)
    args = parser.parse_args(argv)
    print(json.dumps(mcnemar_files(args.predictions_a, args.predictions_b, args.output, args.exact_below), indent=2))


if __name__ == "__main__":
    _main()
