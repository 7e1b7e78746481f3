"""Do a paper's label probabilities depend on what it is scored with? And what does scoring cost?

The same test papers are scored by `Predictor.scores` (what eval, predict, the server and the report call) three
ways: all together, each alone (predict.py's single row), and in reversed order in groups of 8 (a server's
batches). Reported: the largest probability difference from "alone", how many predicted labels differ, and papers/s
for "all together". Runs against any checkout with the same `Predictor` API, so the code before and after a change
is measured by one script on one machine.

    python bench/batch_invariance.py --ckpt logs/bench/serve_export/export --limit 64 [--fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from common import machine_name

ROOT = Path(__file__).resolve().parents[1]


def load_rows(path: Path, limit: int):
    from lmtune.evaluation.predictor import Row

    rows = []
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            rows.append(Row({"title": record["title"], "abstract": record["abstract"]}, record["id"]))
            if len(rows) == limit:
                break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/arxiv/arxiv_cs.jsonl"))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--fp32", action="store_true", help="weights and compute in float32 (32-true)")
    parser.add_argument("--label", default="", help="what this checkout is, for the output")
    parser.add_argument("--cache-dir", default=os.environ.get("LMTUNE_CACHE", str(ROOT / ".cache")))
    a = parser.parse_args()
    from lmtune.evaluation.predictor import Predictor

    predictor = Predictor.from_export(a.ckpt, a.cache_dir, torch.device("cpu"))
    if a.fp32:
        predictor.causal_lm.float()
        predictor.precision = "32-true"
    rows = load_rows(Path(a.data), a.limit)
    predictor.scores(rows[:2])  # warm-up

    def probs(groups):
        started = time.perf_counter()
        scores = torch.cat([predictor.scores(g)[0] for g in groups])
        return torch.softmax(scores.double(), -1), time.perf_counter() - started

    together, seconds = probs([rows])
    alone, alone_seconds = probs([[r] for r in rows])
    backwards = rows[::-1]
    reversed_, _ = probs([backwards[i : i + 8] for i in range(0, len(rows), 8)])
    reversed_ = reversed_.flip(0)
    result = {
        "label": a.label,
        "machine": machine_name(),
        "precision": predictor.precision,
        "papers": len(rows),
        "together_papers_per_s": len(rows) / seconds,
        "alone_papers_per_s": len(rows) / alone_seconds,
    }
    for name, p in (("together", together), ("reversed_groups_of_8", reversed_)):
        result[f"{name}_max_prob_diff_vs_alone"] = float((p - alone).abs().max())
        result[f"{name}_labels_differing_from_alone"] = int((p.argmax(-1) != alone.argmax(-1)).sum())
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
