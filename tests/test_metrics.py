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
