"""Classification metrics for any predictor (LM rank scoring, LM generation, TF-IDF), with torchmetrics.

Predictions are label indices; `INVALID` (-1) marks a generated answer outside the label set. An invalid
answer is always wrong: it is counted as an extra "(invalid)" class for accuracy and the confusion matrix,
while macro-F1 and the per-class table average over the real labels only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import (
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lmtune.evaluation.comparison import bootstrap_intervals, resamples

INVALID = -1
INVALID_NAME = "(invalid)"
BOOTSTRAP_SEED = 0  # every evaluation of n rows draws the same resamples: intervals of two models are paired


def classification_metrics(
    true: Sequence[int],
    pred: Sequence[int],
    labels: list[str],
    probs: torch.Tensor | None = None,
    n_bins: int = 15,
    all_labels: Sequence[Sequence[str]] | None = None,
) -> dict:
    """Accuracy, macro-F1 (each with a bootstrap 95% interval: the same resampled rows for any model scored on
    the same n rows, `comparison.py`), per-class precision/recall/F1/support, the confusion matrix (rows: true
    labels; columns: predicted labels, then "(invalid)"), the invalid-answer rate, the expected calibration error
    when `probs` (N x labels, rows summing to 1) are given, and where each row lists all its labels
    (`all_labels`), how often the answer is one of them."""
    num = len(labels)
    if len(true) != len(pred) or not len(true):
        raise ValueError(f"need as many predictions as true labels (and at least one): {len(pred)} vs {len(true)}")
    y = torch.as_tensor(list(true), dtype=torch.long)
    p = torch.as_tensor(list(pred), dtype=torch.long)
    if y.min() < 0 or y.max() >= num or p.min() < INVALID or p.max() >= num:
        raise ValueError(f"label indices must be in [0, {num}) (predictions may also be {INVALID} = invalid)")
    invalid = p == INVALID
    p_ext = torch.where(invalid, torch.full_like(p, num), p)  # invalid -> extra class `num`
    per_class = {
        name: metric(num + 1, average="none")(p_ext, y)[:num]
        for name, metric in (
            ("precision", MulticlassPrecision),
            ("recall", MulticlassRecall),
            ("f1", MulticlassF1Score),
        )
    }
    support = torch.bincount(y, minlength=num)
    confusion = MulticlassConfusionMatrix(num + 1)(p_ext, y)[:num]  # no true "(invalid)" row
    metrics = {
        "n": len(y),
        "acc": float((p == y).float().mean()),
        "macro_f1": float(per_class["f1"].mean()),
        "invalid_rate": float(invalid.float().mean()),
        "per_class": {
            label: {
                "precision": float(per_class["precision"][i]),
                "recall": float(per_class["recall"][i]),
                "f1": float(per_class["f1"][i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion.tolist(),
        "confusion_columns": [*labels, INVALID_NAME],
    }
    intervals = bootstrap_intervals(y.numpy(), p.numpy(), num, resamples(len(y), seed=BOOTSTRAP_SEED))
    metrics["acc_interval"], metrics["macro_f1_interval"] = intervals["acc"], intervals["macro_f1"]
    if probs is not None:
        metrics["ece"] = expected_calibration_error(probs, y, n_bins)
    if all_labels is not None:
        names = [labels[i] if i != INVALID else None for i in p.tolist()]
        metrics["acc_any_label"] = sum(n in row for n, row in zip(names, all_labels, strict=True)) / len(y)
    return metrics


def expected_calibration_error(probs: torch.Tensor, true, n_bins: int = 15) -> float:
    ece = MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")
    return float(ece(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(true, dtype=torch.long)))


def most_confused(metrics: dict, labels: list[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal cells of the confusion matrix: (true, predicted, count)."""
    columns = metrics["confusion_columns"]
    cells = [
        (labels[i], columns[j], n)
        for i, row in enumerate(metrics["confusion_matrix"])
        for j, n in enumerate(row)
        if i != j and n > 0
    ]
    return sorted(cells, key=lambda c: (-c[2], c[0], c[1]))[:k]
