"""What the adapter cost: the base and the fine-tuned model's language-modelling loss on text outside the task's
format, so a user sees whether fine-tuning damaged general ability (catastrophic forgetting).

The text is plain (no chat template, no prompt): a file the user names (`report.forgetting.path`: `.txt` with one
document per line, or JSONL with a `text` field), else the run's own test rows, which it never trained on, their
columns (or messages) joined as prose. Each document is scored on its own (mean loss per token over all of them),
truncated to `max_length` tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from lmtune.core.errors import DataError
from lmtune.model.precision import autocast_for

log = logging.getLogger(__name__)


def read_texts(path: str | Path, limit: int) -> list[str]:
    """Up to `limit` non-empty documents of a `.txt` (one per line) or `.jsonl` (`text` field) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"report.forgetting.path={path}: not found; give a .txt (one document per line) or .jsonl.")
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if path.suffix == ".jsonl" and line.strip():
                try:
                    line = json.loads(line).get("text", "")
                except (json.JSONDecodeError, AttributeError):
                    raise DataError(f"{path}:{n}: not a JSON object with a `text` field.") from None
            if isinstance(line, str) and line.strip():
                texts.append(line.strip())
            if len(texts) == limit:
                break
    if not texts:
        raise DataError(f"report.forgetting.path={path}: no text in it.")
    return texts


def record_texts(records, limit: int) -> list[str]:
    """The records' text as prose: a conversation's messages, or the columns, joined."""
    texts = []
    for r in list(records)[:limit]:
        if set(r.fields) == {"messages"}:
            texts.append("\n\n".join(m["content"] for m in json.loads(r.fields["messages"])))
        else:
            texts.append("\n\n".join(r.fields.values()))
    return texts


@torch.no_grad()
def text_loss(causal_lm, tokenizer, texts: list[str], max_length: int, precision: str | None = None) -> dict:
    """Mean loss per token (and perplexity) of `texts`, each scored on its own."""
    device = next(causal_lm.parameters()).device
    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            continue
        batch = torch.tensor([ids], device=device)
        with autocast_for(causal_lm, precision):
            logits = causal_lm(input_ids=batch).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, batch[0, 1:], reduction="sum"))
        tokens += len(ids) - 1
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "tokens": tokens, "texts": len(texts)}


def forgetting(module, tokenizer, texts: list[str], max_length: int, precision, source: str) -> dict:
    """The base (adapters off) and the fine-tuned model's loss on `texts`, and the difference."""
    module.eval()
    tuned = text_loss(module.causal_lm, tokenizer, texts, max_length, precision)
    context = module.model.disable_adapter() if hasattr(module.model, "disable_adapter") else None
    if context is None:  # full fine-tuning: the base is not inside the model any more
        log.info("forgetting: adapter=none changed every weight; the base model's loss is not measured")
        return {"source": source, "fine-tuned": tuned}
    with context:
        base = text_loss(module.causal_lm, tokenizer, texts, max_length, precision)
    result = {"source": source, "base": base, "fine-tuned": tuned, "loss_change": tuned["loss"] - base["loss"]}
    log.info(
        "general text (%s): loss %.4f base -> %.4f fine-tuned (%+.4f)",
        source,
        base["loss"],
        tuned["loss"],
        result["loss_change"],
    )
    return result


def forgetting_markdown(result: dict) -> str:
    lines = ["", "## What the adapter cost: general text", ""]
    lines.append(f"Plain text outside the task's format ({result['source']}); lower is better.")
    lines += ["", "| model | loss per token | perplexity |", "|---|---:|---:|"]
    for name in ("base", "fine-tuned"):
        if name in result:
            m = result[name]
            lines.append(f"| {name} | {m['loss']:.4f} | {m['perplexity']:.2f} |")
    if "loss_change" in result:
        change = result["loss_change"]
        lines += ["", f"Fine-tuning changed the loss by {change:+.4f} nats per token ({m['tokens']} tokens)."]
    return "\n".join(lines) + "\n"
