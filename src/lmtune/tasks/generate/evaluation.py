"""Judging written answers: each test conversation's last assistant turn is the reference, the turns before it the
prompt; the model writes greedily up to its turn closer. Scored by exact match (whitespace collapsed), chrF and
ROUGE-L F1 (torchmetrics, over the split) and answer length in words, beside the reference's. Every answer goes to
`predictions.jsonl`, so a number can be checked against the texts behind it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmtune.core.errors import DataError, first_line
from lmtune.core.files import atomic_write
from lmtune.core.progress import Progress
from lmtune.tasks.generate.predictor import ChatPredictor, prompt_and_reference

log = logging.getLogger(__name__)

METRICS = ("exact_match", "chrf", "rougeL", "answer_words", "reference_words")


def text_metrics(answers: list[str], references: list[str]) -> dict:
    """Exact match, corpus chrF (0-100) and mean ROUGE-L F1 (0-1), mean lengths in words."""
    from torchmetrics.text import CHRFScore, ROUGEScore

    n = max(len(answers), 1)
    same = sum(" ".join(a.split()) == " ".join(r.split()) for a, r in zip(answers, references, strict=True))
    chrf = float(CHRFScore()(answers, [[r] for r in references])) * 100 if answers else 0.0
    rouge = float(ROUGEScore(rouge_keys="rougeL")(answers, references)["rougeL_fmeasure"]) if answers else 0.0
    return {
        "exact_match": same / n,
        "chrf": chrf,
        "rougeL": rouge,
        "answer_words": sum(len(a.split()) for a in answers) / n,
        "reference_words": sum(len(r.split()) for r in references) / n,
    }


def default_max_new_tokens(predictor: ChatPredictor, references: list[str]) -> int:
    """Room for twice the longest reference, in this tokenizer's tokens, and a little more."""
    lengths = predictor.formatter.tokenizer(references, add_special_tokens=False)["input_ids"] if references else []
    return 2 * max((len(ids) for ids in lengths), default=32) + 16


def evaluate_generation(
    predictor: ChatPredictor, records, out_dir: Path, max_new_tokens: int | None = None
) -> tuple[dict, list[dict]]:
    """(metrics, one row per record: id, prompt, reference, answer, finish_reason, tokens); both written to
    `out_dir` (`eval_metrics.json`, `predictions.jsonl`)."""
    conversations = [prompt_and_reference(predictor.formatter.task.messages(r.fields)) for r in records]
    references = [reference for _, reference in conversations]
    limit = max_new_tokens or default_max_new_tokens(predictor, references)
    rows, skipped = [], []
    with Progress(len(records), f"writing answers ({predictor.source})") as progress:
        for record, (messages, reference) in zip(records, conversations, strict=True):
            try:
                answer = predictor.answer(messages, max_new_tokens=limit)
            except DataError as e:  # its last user turn cannot fit max_length (training skipped it too)
                skipped.append({"id": record.id, "skipped": first_line(e, 300)})
                progress.advance(1)
                continue
            rows.append(
                {
                    "id": record.id,
                    "prompt": messages[-1]["content"],
                    "reference": reference,
                    "answer": answer.text,
                    "finish_reason": answer.finish_reason,
                    "tokens": answer.tokens,
                    "dropped": answer.dropped,  # early exchanges left out to fit max_length
                }
            )
            progress.advance(1)
    if skipped:
        log.info("%d conversations skipped: their last user turn cannot fit max_length", len(skipped))
    metrics = {
        **text_metrics([r["answer"] for r in rows], [r["reference"] for r in rows]),
        "examples": len(rows),
        "skipped": len(skipped),
        "cut_at_max_new_tokens": sum(r["finish_reason"] == "length" for r in rows),
        "early_exchanges_dropped": sum(r["dropped"] > 0 for r in rows),  # answered without their first turns
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "predictions.jsonl", lambda f: f.writelines(json.dumps(r) + "\n" for r in rows + skipped))
    info = {"source": predictor.source, "precision": predictor.precision, "max_new_tokens": limit, "metrics": metrics}
    atomic_write(out_dir / "eval_metrics.json", lambda f: json.dump(info, f, indent=1))
    log.info(
        "%s: exact match %.3f, chrF %.1f, ROUGE-L %.3f on %d answers",
        predictor.source,
        metrics["exact_match"],
        metrics["chrf"],
        metrics["rougeL"],
        len(rows),
    )
    return metrics, rows
