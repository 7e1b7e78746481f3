"""Evaluation throughput: rank scoring vs free generation (`generate()`) on the same test papers.

Both run through `src/eval.py`'s own code (`load_for_eval`, `predict_records`) on one loaded model, in
alternating order. Beside them, two references on the same prompts explain the ratio:
- prefill only: one forward pass over each whole prompt, one prompt at a time (what every prompt costs at least
  when it is encoded in full);
- prefill of what differs: the same, but the task's opening (the system turn) encoded once, as rank scoring
  does (the floor for rank scoring, which scores each prompt on its own);
- naive rank scoring: one full forward per (paper, label), what rank scoring without a shared prompt cache costs
  (on the first `--naive-limit` papers; it must pick the same labels).

    python bench/eval_throughput.py --ckpt logs/train/runs/<run>/export --limit 200
    python bench/eval_throughput.py --ckpt null -- experiment=smoke           (zero-shot tiny model)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import project_config

from lmtune.commands.eval import load_for_eval
from lmtune.evaluation.metrics import classification_metrics
from lmtune.evaluation.modes import predict_records
from lmtune.model.scoring import SharedPrefix, naive_rank_scores, rank_scores


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


@torch.no_grad()
def prefill_seconds(predictor, prompts: list[list[int]], share_prefix: bool) -> float:
    """One forward over every prompt, one at a time as rank scoring does (with `share_prefix`, continuing the
    task's opening, encoded once, as rank scoring does)."""
    opening = predictor.formatter.opening_ids
    started = time.perf_counter()
    with predictor._autocast():
        shared = SharedPrefix(predictor.causal_lm, opening) if share_prefix else None
        for prompt in prompts:
            start = shared.length if shared and shared.opens(prompt) else 0
            predictor.causal_lm(
                input_ids=torch.tensor([prompt[start:]]).to(predictor.causal_lm.device),
                past_key_values=shared.cache_copy() if start else None,
                logits_to_keep=1,
            )
    return time.perf_counter() - started


def bench(ckpt: str | None, overrides: list[str], limit: int, naive_limit: int, runs: int) -> dict:
    cfg = project_config("eval", [f"ckpt={ckpt if ckpt else 'null'}", "logger=none", *overrides])
    predictor, dm = load_for_eval(cfg)
    records = dm.splits["test"][:limit]
    labels = predictor.labels
    timings = {"rank": [], "generate": []}
    preds = {}
    kwargs = {"max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size}
    for i in range(runs):
        for mode in ("rank", "generate") if i % 2 == 0 else ("generate", "rank"):
            preds[mode], seconds = _timed(lambda m=mode: predict_records(predictor, records, m, **kwargs))
            timings[mode].append(seconds)
            print(
                f"[eval run {i + 1}/{runs}] {mode}: {len(records) / seconds:.2f} examples/s",
                file=sys.stderr,
                flush=True,
            )
    n = len(records)
    metrics = {m: classification_metrics(p.true, p.pred, p.labels, p.probs) for m, p in preds.items()}
    prompts = [ids for ids, _ in predictor.formatter.fit_prompts([r.fields for r in records])]
    prefill = prefill_seconds(predictor, prompts, share_prefix=False)
    prefill_shared = prefill_seconds(predictor, prompts, share_prefix=True)

    few = prompts[:naive_limit]
    answers = predictor.formatter.answer_ids
    with predictor._autocast():
        fast, fast_s = _timed(lambda: rank_scores(predictor.causal_lm, few, answers, predictor.formatter.opening_ids))
        naive, naive_s = _timed(lambda: naive_rank_scores(predictor.causal_lm, few, answers))

    rank_eps = n / statistics.median(timings["rank"])
    generate_eps = n / statistics.median(timings["generate"])
    return {
        "ckpt": str(ckpt),
        "examples": n,
        "runs": runs,
        "labels": labels,
        "mean_prompt_tokens": sum(map(len, prompts)) / n,
        "answer_tokens": [len(a) for a in answers],
        "rank": {"examples_per_s": rank_eps, "acc": metrics["rank"]["acc"], "macro_f1": metrics["rank"]["macro_f1"]},
        "generate": {
            "examples_per_s": generate_eps,
            "acc": metrics["generate"]["acc"],
            "macro_f1": metrics["generate"]["macro_f1"],
            "invalid_rate": metrics["generate"]["invalid_rate"],
            "max_new_tokens": cfg.eval.max_new_tokens,
            "batch_size": cfg.eval.batch_size,
        },
        "rank_over_generate": rank_eps / generate_eps,
        "agreement": sum(a == b for a, b in zip(preds["rank"].pred, preds["generate"].pred, strict=True)) / n,
        "prefill_only": {"examples_per_s": n / prefill},
        "prefill_shared_prefix_once": {
            "examples_per_s": n / prefill_shared,
            "shared_prefix_tokens": len(predictor.formatter.opening_ids),
        },
        "rank_over_prefill": rank_eps / (n / prefill),
        "rank_over_prefill_shared_prefix_once": rank_eps / (n / prefill_shared),
        "naive_rank": {
            "examples": len(few),
            "examples_per_s": len(few) / naive_s,
            "rank_examples_per_s_same_papers": len(few) / fast_s,
            "rank_over_naive": naive_s / fast_s,
            "same_labels": float((fast.argmax(-1) == naive.argmax(-1)).float().mean()),
        },
        "seconds": timings,
        "precision": predictor.precision,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="export/run folder or .ckpt; 'null' for the zero-shot base model")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--naive-limit", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the eval config (e.g. data.path=...)")
    a = parser.parse_args()
    ckpt = None if a.ckpt in (None, "null") else a.ckpt
    print(json.dumps(bench(ckpt, a.overrides, a.limit, a.naive_limit, a.runs), indent=2))
