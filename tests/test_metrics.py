"""Tests of scripts.metrics against hand-computed values and a textbook McNemar table."""

import math

import numpy as np
import pytest

from scripts.metrics import binary_metrics, mcnemar


def test_binary_metrics_hand_computed():
    # 4 motion images, 6 clean; predictions at threshold 0.5:
    # motion: 0.9 0.8 0.4 0.7 -> TP=3, FN=1 ; clean: 0.1 0.2 0.6 0.3 0.05 0.45 -> TN=5, FP=1
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    probs = [0.9, 0.8, 0.4, 0.7, 0.1, 0.2, 0.6, 0.3, 0.05, 0.45]
    m = binary_metrics(labels, probs)
    assert (m.tp, m.fn, m.tn, m.fp) == (3, 1, 5, 1)
    assert m.sensitivity == pytest.approx(0.75)
    assert m.specificity == pytest.approx(5 / 6)
    assert m.balanced_accuracy == pytest.approx((0.75 + 5 / 6) / 2)
    assert m.ppv == pytest.approx(0.75)
    assert m.npv == pytest.approx(5 / 6)
    # AUC by counting concordant pairs: each motion prob vs each clean prob
    pos, neg = probs[:4], probs[4:]
    concordant = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert m.roc_auc == pytest.approx(concordant / 24)


def test_binary_metrics_threshold_and_single_class():
    m = binary_metrics([0, 0, 0], [0.2, 0.6, 0.9], threshold=0.7)
    assert (m.tn, m.fp) == (2, 1)
    assert math.isnan(m.sensitivity) and math.isnan(m.roc_auc)
    assert m.balanced_accuracy == pytest.approx(2 / 3)


def test_binary_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics([0, 2], [0.5, 0.5])


def _paired(b: int, c: int, both_right: int, both_wrong: int):
    labels = np.ones(b + c + both_right + both_wrong, dtype=int)
    a = np.concatenate([np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)])
    bb = np.concatenate([np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)])
    return labels, a, bb


def test_mcnemar_chi2_textbook():
    # Classic example (Agresti): b=150, c=86 discordant pairs -> chi2_cc = (|150-86|-1)^2/236 = 16.818
    labels, a, b = _paired(150, 86, 794, 570)
    r = mcnemar(labels, a, b)
    assert r.method == "chi2_corrected"
    assert (r.b, r.c, r.both_correct, r.both_wrong) == (150, 86, 794, 570)
    assert r.statistic == pytest.approx(63**2 / 236, rel=1e-9)
    assert r.p_value == pytest.approx(4.115e-5, rel=1e-2)


def test_mcnemar_exact_small_counts():
    # b=1, c=7: two-sided exact binomial p = 2 * P(X<=1 | n=8, 0.5) = 2 * 9/256
    labels, a, b = _paired(1, 7, 10, 2)
    r = mcnemar(labels, a, b)
    assert r.method == "exact"
    assert r.p_value == pytest.approx(18 / 256)
    same = mcnemar(labels, a, a)
    assert same.p_value == 1.0 and same.b == same.c == 0


# ---- statistics of the transfer study: bootstrap CIs, calibration, thresholds, McNemar on files ----
import csv  # noqa: E402
import json  # noqa: E402

from scripts.metrics import (  # noqa: E402
    bootstrap_ci,
    choose_threshold,
    evaluation_statistics,
    expected_calibration_error,
    mcnemar_files,
    read_threshold,
    save_roc_plot,
    summarise_folds,
    write_threshold,
)


def test_expected_calibration_error_hand_computed():
    # two bins [0, .5) and [.5, 1]: bin 0 holds .1 .4 .35 (labels 0 0 1): |1/3 - 0.85/3| * 3/4 = 0.0375;
    # bin 1 holds .9 (label 1): |1 - .9| * 1/4 = 0.025
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.9], n_bins=2) == pytest.approx(0.0625)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)
    assert expected_calibration_error([1, 1], [0.0, 0.0]) == pytest.approx(1.0)


def test_bootstrap_ci_contains_the_point_estimate():
    rng = np.random.RandomState(3)
    labels = rng.randint(0, 2, 80)
    probs = np.clip(0.35 * labels + 0.65 * rng.rand(80), 0, 1)
    ci = bootstrap_ci(labels, probs, n_bootstrap=400, seed=1)
    point = binary_metrics(labels, probs)
    for name in ("balanced_accuracy", "sensitivity", "specificity", "roc_auc"):
        assert ci[name]["estimate"] == pytest.approx(getattr(point, name))
        assert ci[name]["low"] <= ci[name]["estimate"] <= ci[name]["high"]
        assert ci[name]["high"] - ci[name]["low"] > 0.01  # a real interval, not a point
        assert ci[name]["n_valid"] == 400
    again = bootstrap_ci(labels, probs, n_bootstrap=400, seed=1)
    assert again == ci  # seeded
    # participant-level resampling: pairs of images per participant
    grouped = bootstrap_ci(labels, probs, n_bootstrap=200, groups=np.arange(80) // 2)
    assert grouped["roc_auc"]["low"] <= grouped["roc_auc"]["estimate"] <= grouped["roc_auc"]["high"]


def test_bootstrap_ci_of_a_perfect_classifier_is_degenerate():
    ci = bootstrap_ci([0, 0, 1, 1, 1], [0.1, 0.2, 0.8, 0.9, 0.7], n_bootstrap=100)
    assert ci["balanced_accuracy"]["low"] == ci["balanced_accuracy"]["high"] == 1.0


def test_choose_threshold_youden_and_fixed_specificity():
    labels = [0, 0, 0, 1, 0, 1, 1]
    probs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    # J(0.7)=1/3, J(0.6)=2/3, J(0.5)=2/3-1/4, J(0.4)=1-1/4=0.75 (max), J(0.3)=0.5
    y = choose_threshold(labels, probs)
    assert y["threshold"] == pytest.approx(0.4) and y["sensitivity"] == 1.0 and y["specificity"] == 0.75
    s = choose_threshold(labels, probs, "specificity", target_specificity=1.0)
    assert s["threshold"] == pytest.approx(0.6) and s["sensitivity"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.3])


def test_threshold_file_round_trip(tmp_path):
    write_threshold({"threshold": 0.37, "method": "youden"}, tmp_path / "t.json")
    assert read_threshold(tmp_path / "t.json") == pytest.approx(0.37)
    assert read_threshold(None) == 0.5
    (tmp_path / "bad.json").write_text('{"threshold": 3}')
    with pytest.raises(ValueError, match="bad.json"):
        read_threshold(tmp_path / "bad.json")


def test_roc_plot_and_statistics(tmp_path):
    labels, probs = [0, 0, 1, 1, 0, 1], [0.2, 0.3, 0.7, 0.4, 0.6, 0.9]
    png = save_roc_plot(labels, probs, tmp_path / "roc.png", threshold=0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_roc_plot([1, 1], [0.2, 0.3], tmp_path / "none.png") is None
    stats_out = evaluation_statistics(labels, probs, n_bootstrap=50)
    assert stats_out["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    assert set(stats_out["ci"]) == {"balanced_accuracy", "sensitivity", "specificity", "roc_auc"}
    assert 0 <= stats_out["threshold_selection"]["threshold"] <= 1


def _write_predictions(path, labels, preds, images=None):
    images = images or [f"img{i:04d}.nii.gz" for i in range(len(labels))]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "participant_id", "session_id", "label", "prob_motion", "prediction"])
        for im, y, p in zip(images, labels, preds):
            w.writerow([im, "sub-X", "ses-1", int(y), f"{float(p):.6f}", int(p)])
    return path


def test_mcnemar_files_textbook_table_in_any_row_order(tmp_path):
    labels, a, b = _paired(150, 86, 794, 570)
    fa = _write_predictions(tmp_path / "a.csv", labels, a)
    order = np.random.RandomState(0).permutation(labels.size)  # the join is on image, not row order
    images = [f"img{i:04d}.nii.gz" for i in range(labels.size)]
    fb = _write_predictions(tmp_path / "b.csv", labels[order], b[order], [images[i] for i in order])
    out = mcnemar_files(fa, fb, tmp_path / "m.json")
    assert (out["b"], out["c"]) == (150, 86) and out["method"] == "chi2_corrected"
    assert out["statistic"] == pytest.approx(63**2 / 236)
    assert out["accuracy_a"] == pytest.approx(944 / 1600)
    assert json.loads((tmp_path / "m.json").read_text())["p_value"] == pytest.approx(out["p_value"])


def test_mcnemar_files_rejects_different_images_or_labels(tmp_path):
    fa = _write_predictions(tmp_path / "a.csv", [1, 0], [1, 0])
    fb = _write_predictions(tmp_path / "b.csv", [1, 0, 1], [1, 0, 1])
    with pytest.raises(ValueError, match="same images"):
        mcnemar_files(fa, fb)
    fc = _write_predictions(tmp_path / "c.csv", [0, 0], [1, 0])
    with pytest.raises(ValueError, match="labels"):
        mcnemar_files(fa, fc)


def test_summarise_folds_mean_and_std(tmp_path):
    rows = [
        {"fold": 0, "split": "test", "balanced_accuracy": 0.7, "roc_auc": 0.8},
        {"fold": 1, "split": "test", "balanced_accuracy": 0.9, "roc_auc": None},
        {"fold": 0, "split": "validation", "balanced_accuracy": 0.5},
    ]
    s = summarise_folds(rows, tmp_path)
    assert s["test"]["balanced_accuracy"]["mean"] == pytest.approx(0.8)
    assert s["test"]["balanced_accuracy"]["std"] == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert s["test"]["balanced_accuracy"]["text"] == "80.0 ± 14.1"
    assert s["test"]["roc_auc"]["n"] == 1 and s["test"]["roc_auc"]["std"] is None
    assert s["validation"]["n_folds"] == 1
    assert (tmp_path / "cv_folds.csv").is_file() and json.loads((tmp_path / "cv_summary.json").read_text()) == s
