"""Evaluate a predictor on labelled records in rank and/or generate mode, and write the outputs.

- rank: the label whose full answer (label + end-of-turn) is most likely after the prompt; always a valid
  label, with probabilities (softmax over the label set), hence calibration (ECE).
- generate: greedy decoding, the answer parsed against the label set; anything else is "(invalid)" and wrong.
With both, the report says how often they agree: a fine-tuned model should agree with itself.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch

from lmtune.data.records import Record
from lmtune.evaluation.metrics import INVALID, classification_metrics
from lmtune.evaluation.outputs import EvalPredictions, log_to_wandb, shown_columns, write_eval_outputs
from lmtune.evaluation.predictor import Predictor, Row
from lmtune.evaluation.trust import trust_metrics

log = logging.getLogger(__name__)

MODES = ("rank", "generate", "both")
_EDGES = re.compile(r"^[\s`'\"*]+|[\s`'\".*]+$")


def parse_answer(text: str, labels: list[str]) -> int:
    """The label index of a generated answer, or INVALID. Surrounding quotes, backticks, bold markers and a
    final period are forgiven; anything else (a sentence, a label outside the set) is not a valid answer."""
    answer = _EDGES.sub("", text)
    return labels.index(answer) if answer in labels else INVALID


def predict_records(
    predictor: Predictor, records: list[Record], mode: str, max_new_tokens: int = 16, batch_size: int = 16
) -> EvalPredictions:
    labels = predictor.labels
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise ValueError(f"records carry labels outside the model's label set {labels}: {unknown}")
    rows = [Row(r.fields, r.id) for r in records]
    common = dict(labels=labels, ids=[r.id for r in records], shown=shown_columns(records))
    true = [index[r.label] for r in records]
    if mode == "rank":
        scores, _ = predictor.scores(rows)
        probs = predictor.probabilities(scores).float()  # the export's temperature applied, where it has one
        # the true answer's loss per answer token, as training's validation reports it (`val/loss`)
        answer_tokens = sum(len(predictor.formatter.answer_ids[t]) for t in true)
        loss = -float(scores[torch.arange(len(true)), torch.tensor(true)].sum()) / max(answer_tokens, 1)
        # the decision from the scores themselves (float32 probabilities can tie where the scores do not); an
        # exact tie goes to the first label, as in predict and the server
        preds = EvalPredictions(**common, true=true, pred=scores.argmax(-1).tolist(), probs=probs, loss=loss)
        preds.scores = scores.double()
        return preds
    if mode == "generate":
        answers = predictor.generate(rows, max_new_tokens, batch_size)
        return EvalPredictions(**common, true=true, pred=[parse_answer(a, labels) for a in answers], answers=answers)
    raise ValueError(f"eval mode {mode!r}: use one of {MODES}")


def evaluate(
    predictor: Predictor,
    records: list[Record],
    mode: str,
    out_dir: str | Path,
    wandb_run=None,
    prefix: str = "eval",
    top_k: int = 3,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    meta: dict | None = None,
    coverage: float = 0.9,
    keep: dict | None = None,
) -> dict:
    """Run the mode(s), write the outputs (the first mode at `out_dir`, generate under `out_dir/generate` when
    both run) and return {"rank": metrics, "generate": metrics, "agreement": fraction} for what ran; `coverage`:
    the label sets' target where the predictor is calibrated; `keep`: filled with each mode's predictions."""
    if mode not in MODES:
        raise ValueError(f"eval.mode={mode!r}: use one of {', '.join(MODES)}")
    modes = ["rank", "generate"] if mode == "both" else [mode]
    out_dir = Path(out_dir)
    results, predictions = {}, {}
    for n, current in enumerate(modes):
        started = time.perf_counter()
        preds = predict_records(predictor, records, current, max_new_tokens, batch_size)
        seconds = time.perf_counter() - started
        all_labels = [r.labels for r in records] if records and records[0].labels else None
        metrics = classification_metrics(preds.true, preds.pred, preds.labels, preds.probs, all_labels=all_labels)
        if preds.loss is not None:
            metrics["loss"] = preds.loss
        if preds.probs is not None:
            metrics.update(trust_metrics(preds, predictor.calibration, coverage, all_labels))
        metrics["examples_per_s"] = len(records) / seconds
        target = out_dir if n == 0 else out_dir / current
        info = {**(meta or {}), "mode": current, "source": predictor.source, "seconds": seconds}
        if len(modes) == 2 and n == 1:
            agree = sum(a == b for a, b in zip(predictions["rank"].pred, preds.pred, strict=True)) / len(records)
            results["agreement"] = metrics["rank_generate_agreement"] = agree
        paths = write_eval_outputs(target, preds, metrics, info, top_k)
        if wandb_run is not None:
            log_to_wandb(wandb_run, preds, metrics, paths, prefix=f"{prefix}/{current}")
        log.info(
            "%s %s: accuracy %.4f, macro-F1 %.4f, %s (%d examples, %.1f examples/s) -> %s",
            prefix,
            current,
            metrics["acc"],
            metrics["macro_f1"],
            f"ECE {metrics['ece']:.4f}" if "ece" in metrics else f"invalid {metrics['invalid_rate']:.3f}",
            len(records),
            metrics["examples_per_s"],
            target,
        )
        results[current], predictions[current] = metrics, preds
    if keep is not None:  # the predictions themselves, for a caller that compares models row by row
        keep.update(predictions)
    if "agreement" in results:
        log.info("rank and generate agree on %.1f %% of the examples", 100 * results["agreement"])
        if wandb_run is not None:
            wandb_run.summary[f"{prefix}/rank_generate_agreement"] = results["agreement"]
    return results
