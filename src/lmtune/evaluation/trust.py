"""How far a classifier's probabilities can be trusted on a split: the risk-coverage curve (accuracy when only
the most confident rows are answered), the label sets' empirical coverage and size, and the plots for the report
(a reliability diagram before and after calibration, the risk-coverage curve)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmtune.model.calibration import label_set


def risk_coverage(probs: torch.Tensor, true, pred=None) -> tuple[list[float], list[float]]:
    """(coverage, accuracy) when only the most confident rows are answered: the k most confident rows for
    k = 1..n, by the top probability (ties in row order)."""
    probs = probs.double()
    true = torch.as_tensor(true, dtype=torch.long)
    pred = probs.argmax(-1) if pred is None else torch.as_tensor(pred, dtype=torch.long)
    order = torch.argsort(probs.max(-1).values, descending=True, stable=True)
    correct = (pred[order] == true[order]).double().cumsum(0)
    answered = torch.arange(1, len(true) + 1, dtype=torch.float64)
    return (answered / len(true)).tolist(), (correct / answered).tolist()


def accuracy_at_coverage(probs: torch.Tensor, true, coverage: float, pred=None) -> float:
    """Accuracy on the ceil(coverage * n) most confident rows."""
    coverages, accuracies = risk_coverage(probs, true, pred)
    k = max(1, math.ceil(coverage * len(coverages) - 1e-9))
    return accuracies[k - 1]


def set_metrics(probs: torch.Tensor, true, labels: list[str], threshold: float, all_labels=None) -> dict:
    """Empirical coverage and mean size of the label sets at `threshold` (and, where rows list every label they
    carry, how often a set holds at least one of them)."""
    sets = [label_set(row, labels, threshold) for row in probs.double().tolist()]
    true_names = [labels[t] for t in true]
    metrics = {
        "coverage": sum(t in s for t, s in zip(true_names, sets, strict=True)) / max(len(sets), 1),
        "mean_size": sum(len(s) for s in sets) / max(len(sets), 1),
        "singletons": sum(len(s) == 1 for s in sets) / max(len(sets), 1),
    }
    if all_labels is not None:
        hit = [bool(set(s) & set(a)) for s, a in zip(sets, all_labels, strict=True)]
        metrics["coverage_any_label"] = sum(hit) / max(len(hit), 1)
    return metrics


AT_COVERAGE = (0.8, 0.9)  # the shares of rows answered the report gives the accuracy of


def trust_metrics(predictions, calibration, coverage: float, all_labels=None) -> dict:
    """What the report and eval.py add for a model with probabilities: the calibration error before the export's
    temperature (after is `ece`), the label sets at `coverage` on this split, accuracy at 80% and 90% coverage."""
    from lmtune.evaluation.metrics import expected_calibration_error

    probs, true = predictions.probs, predictions.true
    metrics = {
        "acc_at_coverage": {f"{c:.1f}": accuracy_at_coverage(probs, true, c, predictions.pred) for c in AT_COVERAGE}
    }
    if calibration is None:
        return metrics
    metrics["temperature"] = calibration.temperature
    metrics["ece_floor"] = ece_floor(probs)
    if predictions.scores is not None:
        metrics["ece_uncalibrated"] = expected_calibration_error(torch.softmax(predictions.scores, -1), true)
    if calibration.scores:
        measured = set_metrics(probs, true, predictions.labels, calibration.threshold(coverage), all_labels)
        metrics["sets"] = {"target": coverage, **measured}
    return metrics


def ece_floor(probs: torch.Tensor, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The calibration error a perfectly calibrated model with these confidences shows on this many rows, from
    sampling alone: the mean over `draws` where each row is right with the probability it states. A measured ECE
    near it is as small as a split of this size can show; binned like `expected_calibration_error`."""
    confidence = probs.double().max(-1).values
    n = len(confidence)
    if n == 0:
        return float("nan")
    index = (confidence * bins).floor().long()  # [lo, hi) bins and 1.0 alone, as torchmetrics
    right = torch.rand(draws, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < confidence
    gaps = torch.zeros(draws, bins + 1, dtype=torch.float64).index_add_(1, index, right.double() - confidence)
    return float(gaps.abs().sum(1).mean() / n)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def reliability(probs: torch.Tensor, true, bins: int = 15) -> tuple[list[float], list[float], list[int]]:
    """(mean confidence, accuracy, rows) per confidence bin that holds rows."""
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == torch.as_tensor(true)).double()
    index = (confidence * bins).long().clamp(max=bins - 1)
    points = ([], [], [])
    for b in range(bins):
        inside = index == b
        if inside.any():
            points[0].append(float(confidence[inside].mean()))
            points[1].append(float(correct[inside].mean()))
            points[2].append(int(inside.sum()))
    return points


def plot_reliability(curves: dict[str, torch.Tensor], true, path: Path) -> Path:
    """Accuracy against confidence for each set of probabilities (a calibrated model lies on the diagonal)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, probs in curves.items():
        confidence, accuracy, _ = reliability(probs, true)
        ax.plot(confidence, accuracy, marker="o", label=name)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_risk_coverage(probs: torch.Tensor, true, pred, path: Path) -> Path:
    """Accuracy of the answered rows against the share answered, the most confident first."""
    plt = _pyplot()
    coverages, accuracies = risk_coverage(probs, true, pred)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(coverages, accuracies)
    for c in AT_COVERAGE:
        ax.axvline(c, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("share of rows answered (most confident first)")
    ax.set_ylabel("accuracy of the answered rows")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
