"""The classical baseline: TF-IDF n-grams + logistic regression, so every LM result has a cheap point of comparison.

It reads the same `Record`s as the LM and returns the same `EvalPredictions`, so its metrics and output files
are computed by the same code (`metrics.py`, `outputs.py`) and the two can be compared number for number.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from lmtune.core.errors import UserError
from lmtune.data.records import Record
from lmtune.evaluation.metrics import classification_metrics
from lmtune.evaluation.outputs import EvalPredictions, shown_columns, write_eval_outputs
from lmtune.evaluation.trust import trust_metrics


def record_text(record: Record) -> str:
    """The text the LM reads too: the prompt's columns joined ("first. second"; a short column's words
    weigh as much as a long one's)."""
    return ". ".join(record.fields.values())


def fit_tfidf(
    records: Sequence[Record],
    labels: list[str],
    *,
    C: float = 10.0,
    min_df: int | float = 2,
    max_features: int | None = None,
    class_weight: str | dict | None = None,
    max_iter: int = 1000,
    solver: str = "newton-cg",
) -> Pipeline:
    """A fitted scikit-learn Pipeline (TfidfVectorizer -> LogisticRegression) on `records`' labels.

    Word 1-2 grams with sublinear tf (log counts: a word repeated ten times is not ten times the evidence),
    `min_df` drops n-grams too rare to generalise; multinomial logistic regression gives calibrated-ish
    probabilities, so ECE and top-k are comparable with the LM's rank scores. The newton-cg solver reaches
    the same optimum as sklearn's default lbfgs about 10x faster here (hundreds of thousands of n-gram
    weights per class: lbfgs needs ~100 slow iterations, newton-cg ~8).
    """
    outside = sorted({r.label for r in records} - set(labels))
    if outside:
        raise UserError(f"training records have labels outside the label set {labels}: {outside}")
    present = {r.label for r in records}
    if len(present) < 2:
        raise UserError(
            f"the TF-IDF baseline needs training examples of at least two labels, got {sorted(present)} "
            f"({len(records)} examples); raise data.limit_train or use baseline.train_on=all."
        )
    model = Pipeline(
        [
            (
                "tfidf",
                TfidfVectorizer(
                    sublinear_tf=True,
                    ngram_range=(1, 2),
                    min_df=min_df,
                    max_features=max_features,
                    strip_accents="unicode",
                    dtype=np.float32,
                ),
            ),
            ("logreg", LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight, solver=solver)),
        ]
    )
    try:
        model.fit([record_text(r) for r in records], [r.label for r in records])
    except ValueError as e:  # e.g. "After pruning, no terms remain": min_df too high for this few documents
        raise UserError(
            f"TF-IDF baseline cannot be fitted on {len(records)} examples: {e}. "
            f"Lower baseline.min_df, or train on more examples."
        ) from None
    return model


def predict_tfidf(model, records: Sequence[Record], labels: list[str]) -> EvalPredictions:
    """Predictions with probabilities in `labels` order (a label unseen in training gets probability 0)."""
    if not records:
        raise UserError("no examples to evaluate the TF-IDF baseline on (the split is empty).")
    proba = model.predict_proba([record_text(r) for r in records])
    probs = np.zeros((len(records), len(labels)), dtype=np.float64)
    column = {label: i for i, label in enumerate(labels)}
    probs[:, [column[c] for c in model.classes_]] = proba  # sklearn orders classes_ sorted; ours may differ
    probs = torch.from_numpy(probs)
    return EvalPredictions(
        labels=list(labels),
        ids=[r.id for r in records],
        shown=shown_columns(records),
        true=[column[r.label] for r in records],
        pred=probs.argmax(dim=1).tolist(),
        probs=probs,
    )


def evaluate_tfidf(
    train: Sequence[Record], records: Sequence[Record], labels: list[str], out_dir, meta: dict | None = None, **params
) -> tuple[EvalPredictions, dict, dict]:
    """Fit on `train`, evaluate on `records`, write the standard eval files; (predictions, metrics, paths)."""
    start = time.perf_counter()
    model = fit_tfidf(train, labels, **params)
    fit_seconds = round(time.perf_counter() - start, 3)
    predictions = predict_tfidf(model, records, labels)
    all_labels = [r.labels for r in records] if records[0].labels else None
    metrics = classification_metrics(
        predictions.true, predictions.pred, labels, predictions.probs, all_labels=all_labels
    )
    metrics.update(trust_metrics(predictions, None, 0.9))  # accuracy at 80% and 90% coverage, as the LM's
    info = {"model": "tfidf+logreg", "train_examples": len(train), "fit_seconds": fit_seconds, **(meta or {})}
    return predictions, metrics, write_eval_outputs(out_dir, predictions, metrics, info)
