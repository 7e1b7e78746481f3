"""What an evaluation leaves behind, the same for every predictor (LM rank, LM generate, TF-IDF baseline).

<out_dir>/
  eval_metrics.json      metrics (accuracy, macro-F1, per class, confusion matrix, ECE / invalid rate) + meta
  predictions.jsonl      one line per example: id, true, predicted, top-k probabilities (and the raw answer)
  confusion_matrix.png   rows normalised to the true label's support, readable label names
  per_class.md           precision / recall / F1 / support per label, as a markdown table
  reliability.png        accuracy against confidence (before and after calibration, where the export has it)
  risk_coverage.png      accuracy when only the most confident rows are answered
and, with a W&B run, the same metrics, the confusion matrix (image and `wandb.plot.confusion_matrix`) and a
predictions table with the columns the prompt reads, the true and the predicted label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtune.core.files import atomic_write
from lmtune.data.records import Record
from lmtune.evaluation.metrics import INVALID, INVALID_NAME
from lmtune.evaluation.trust import plot_reliability, plot_risk_coverage


def shown_columns(records: list[Record]) -> dict[str, list[str]]:
    """What a predictions table shows of each example: the columns the prompt reads, in its order."""
    return {column: [r.fields[column] for r in records] for column in (records[0].fields if records else {})}


@dataclass
class EvalPredictions:
    """One prediction per example; `pred` is a label index or INVALID (an answer outside the label set)."""

    labels: list[str]
    ids: list[str]
    shown: dict[str, list[str]]  # column -> its value per example (the prompt's columns)
    true: list[int]
    pred: list[int]
    probs: torch.Tensor | None = None  # (N, labels), rows sum to 1 (rank scoring, TF-IDF)
    answers: list[str] | None = None  # raw generated text (generate mode)
    loss: float | None = None  # rank mode: the true answer's mean loss per answer token
    scores: torch.Tensor | None = None  # rank mode: the rank scores, before any temperature (for "before" plots)

    def name_of(self, index: int) -> str:
        return INVALID_NAME if index == INVALID else self.labels[index]

    def rows(self, top_k: int = 3) -> list[dict]:
        rows = []
        for n, (id_, t, p) in enumerate(zip(self.ids, self.true, self.pred, strict=True)):
            row = {"id": id_, "true": self.labels[t], "predicted": self.name_of(p)}
            if self.probs is not None:
                top = torch.topk(self.probs[n], min(top_k, len(self.labels)))
                row["probs"] = {
                    self.labels[i]: round(float(v), 6) for v, i in zip(top.values, top.indices, strict=True)
                }
            if self.answers is not None:
                row["answer"] = self.answers[n]
            rows.append(row)
        return rows


def per_class_markdown(metrics: dict) -> str:
    lines = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, m in metrics["per_class"].items():
        lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines.append(
        f"| **all** (accuracy {metrics['acc']:.3f}, macro-F1 {metrics['macro_f1']:.3f}) | | | | {metrics['n']} |"
    )
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(metrics: dict, path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix; the "(invalid)" column only appears when there were invalid answers."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers)
    import matplotlib.pyplot as plt

    counts = torch.tensor(metrics["confusion_matrix"], dtype=torch.float64)
    columns = list(metrics["confusion_columns"])
    if counts[:, -1].sum() == 0:
        counts, columns = counts[:, :-1], columns[:-1]
    rows = columns[: counts.shape[0]]
    normalised = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = 1.0 + 0.55 * max(len(columns), 4)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                value = normalised[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
    ax.set_title(title or f"accuracy {metrics['acc']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (n={metrics['n']})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true label")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_eval_outputs(
    out_dir: str | Path, predictions: EvalPredictions, metrics: dict, meta: dict | None = None, top_k: int = 3
) -> dict[str, Path]:
    """Write the four files; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "eval_metrics.json",
        "predictions": out_dir / "predictions.jsonl",
        "confusion_matrix": out_dir / "confusion_matrix.png",
        "per_class": out_dir / "per_class.md",
    }
    document = {**(meta or {}), "labels": predictions.labels, "metrics": metrics}
    atomic_write(paths["metrics"], lambda f: f.write(json.dumps(document, indent=2) + "\n"))
    rows = predictions.rows(top_k)
    atomic_write(paths["predictions"], lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write(paths["per_class"], lambda f: f.write(per_class_markdown(metrics)))
    plot_confusion_matrix(metrics, paths["confusion_matrix"])
    if predictions.probs is not None:
        paths["reliability"], paths["risk_coverage"] = out_dir / "reliability.png", out_dir / "risk_coverage.png"
        curves = {"as scored": predictions.probs}
        if predictions.scores is not None and "temperature" in metrics:
            curves = {
                "before calibration": torch.softmax(predictions.scores, -1),
                "after calibration": predictions.probs,
            }
        plot_reliability(curves, predictions.true, paths["reliability"])
        plot_risk_coverage(predictions.probs, predictions.true, predictions.pred, paths["risk_coverage"])
    return paths


def log_to_wandb(run, predictions: EvalPredictions, metrics: dict, paths: dict, prefix: str = "eval") -> None:
    """Metrics in the summary, the confusion matrix as image and as W&B's interactive plot, the reliability and
    risk-coverage plots, a predictions table."""
    import wandb

    png = paths["confusion_matrix"]
    names = (
        "acc",
        "macro_f1",
        "invalid_rate",
        "ece",
        "ece_uncalibrated",
        "ece_floor",
        "temperature",
        "acc_any_label",
        "n",
    )
    scalars = {f"{prefix}/{k}": metrics[k] for k in names if k in metrics}
    for key in ("acc", "macro_f1"):
        if f"{key}_interval" in metrics:
            scalars[f"{prefix}/{key}_low"], scalars[f"{prefix}/{key}_high"] = metrics[f"{key}_interval"]
    if "sets" in metrics:
        scalars[f"{prefix}/set_coverage"] = metrics["sets"]["coverage"]
        scalars[f"{prefix}/set_size"] = metrics["sets"]["mean_size"]
    plots = {
        f"{prefix}/{name}": wandb.Image(str(paths[name])) for name in ("reliability", "risk_coverage") if name in paths
    }
    scalars.update({f"{prefix}/f1/{label}": m["f1"] for label, m in metrics["per_class"].items()})
    valid = [n for n, p in enumerate(predictions.pred) if p != INVALID]  # W&B's plot only knows the label set
    table = wandb.Table(columns=["id", *predictions.shown, "true", "predicted", "p(predicted)"])
    for n, row in enumerate(predictions.rows(top_k=1)):
        p = float(predictions.probs[n].max()) if predictions.probs is not None else None
        shown = [values[n] for values in predictions.shown.values()]
        table.add_data(row["id"], *shown, row["true"], row["predicted"], p)
    run.log(
        {
            **scalars,
            **plots,
            f"{prefix}/confusion_matrix_image": wandb.Image(str(png)),
            f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=[predictions.true[n] for n in valid],
                preds=[predictions.pred[n] for n in valid],
                class_names=predictions.labels,
                title=f"{prefix} confusion matrix",
            ),
            f"{prefix}/predictions": table,
        }
    )
    run.summary.update(scalars)
