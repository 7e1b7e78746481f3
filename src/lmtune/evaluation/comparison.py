"""Whether a difference on the test split is a win or noise: percentile bootstrap intervals for accuracy and macro-F1
(the same resampled rows for every model, from a seed, so the intervals are reproducible and paired) and McNemar's
exact test of two models' right/wrong answers on the same rows.

Macro-F1 follows `metrics.classification_metrics`: per label 2TP / (2TP + FP + FN), 0 where a label has neither
support nor predictions, averaged over the label set; an invalid answer (-1) is wrong and a false negative.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

DRAWS = 1000
LEVEL = 0.95


def _macro_f1(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 of each row of `true`/`pred` (draws x n) over k labels."""
    f1 = np.zeros(true.shape[0])
    for label in range(k):
        tp = ((pred == label) & (true == label)).sum(1)
        fp = ((pred == label) & (true != label)).sum(1)
        fn = ((pred != label) & (true == label)).sum(1)
        denominator = 2 * tp + fp + fn
        f1 += np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return f1 / k


def resamples(n: int, seed: int = 0, draws: int = DRAWS) -> np.ndarray:
    """draws x n row indices, drawn with replacement; the same for every model compared on these n rows."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap_intervals(true, pred, num_labels: int, rows: np.ndarray, level: float = LEVEL) -> dict:
    """{"acc": [low, high], "macro_f1": [low, high]}: percentile intervals over the resampled `rows`."""
    true, pred = np.asarray(true), np.asarray(pred)
    t, p = true[rows], pred[rows]
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name, values in (("acc", (t == p).mean(1)), ("macro_f1", _macro_f1(t, p, num_labels))):
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[name] = [float(low), float(high)]
    return intervals


def mcnemar(true, pred_a, pred_b) -> dict:
    """McNemar's exact test: of the rows where exactly one model is right, is A right more often than chance?
    `a_only`/`b_only`: rows only A/B gets right; `p_value`: two-sided."""
    true, a, b = np.asarray(true), np.asarray(pred_a), np.asarray(pred_b)
    a_only = int(((a == true) & (b != true)).sum())
    b_only = int(((a != true) & (b == true)).sum())
    disagree = a_only + b_only
    p_value = 1.0 if disagree == 0 else float(binomtest(a_only, disagree, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p_value}


def verdict(name_a: str, name_b: str, acc_a: float, acc_b: float, test: dict, alpha: float = 0.05) -> str:
    """The comparison in plain words, as the report and the model card say it."""
    difference = 100 * (acc_a - acc_b)
    numbers = (
        f"{difference:+.1f} accuracy points; {test['a_only']} rows only {name_a} gets right, {test['b_only']} only "
        f"{name_b}; McNemar p = {test['p_value']:.3g}"
    )
    subject = name_a[:1].upper() + name_a[1:]
    if test["p_value"] < alpha and difference > 0:
        return f"{subject} beats {name_b} on the test split ({numbers})."
    if test["p_value"] < alpha:
        return f"{subject} does **not** beat {name_b}: it is worse on the test split ({numbers})."
    return f"{subject} does **not** beat {name_b} by more than chance on the test split ({numbers})."
