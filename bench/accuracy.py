"""Accuracy on the shared arXiv data: fine-tuned LoRA vs zero-shot vs TF-IDF + logistic regression.

Runs the user-facing commands as a user would and reads the files they write:
- `src/train.py <experiment>`: fine-tunes for the experiment's fixed budget, then its report evaluates the
  fine-tuned model, the zero-shot base model and TF-IDF + LR on the same training papers, all on the same
  test split (`eval_metrics.json`, `zero_shot/`, `tfidf/` in the run folder);
- `src/baseline.py <experiment> baseline.train_on=all`: TF-IDF + LR on the whole train split, same test split.

    python bench/accuracy.py                         (experiment=lora_arxiv on ../shared/data/arxiv)
    python bench/accuracy.py --experiment smoke      (tiny model, seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from common import ROOT, SHARED_ARXIV, run_logged


def run(script: str, overrides: list[str], work: Path) -> float:
    """`python src/<script> <overrides>` in its own run folder; the wall seconds it took."""
    started = time.perf_counter()
    run_logged([sys.executable, str(ROOT / "src" / script), *overrides, f"hydra.run.dir={work}"], work / "log.txt")
    return time.perf_counter() - started


def _scores(eval_metrics: Path) -> dict:
    doc = json.loads(eval_metrics.read_text())
    m = doc["metrics"]
    return {"acc": m["acc"], "macro_f1": m["macro_f1"], "n": m["n"], "train_examples": doc.get("train_examples")}


def bench(experiment: str, data_overrides: list[str], work: Path) -> dict:
    common = [f"experiment={experiment}", *data_overrides]
    finetune_dir, tfidf_dir = work / "finetune", work / "tfidf_all"
    wall = run("train.py", [*common, "logger=csv"], finetune_dir)
    run("baseline.py", [*common, "baseline.train_on=all", "logger=none"], tfidf_dir)

    summary = json.loads((finetune_dir / "metrics.json").read_text())
    data, train = summary["data"], summary["train"]
    run_cfg = yaml.safe_load((finetune_dir / "export" / "config.yaml").read_text())
    batch = run_cfg["data"]["batch_size"] * run_cfg["trainer"]["accumulate_grad_batches"]
    finetuned = _scores(finetune_dir / "eval_metrics.json")
    rows = {
        "tfidf_same": _scores(finetune_dir / "tfidf" / "eval_metrics.json"),
        "tfidf_all": _scores(tfidf_dir / "eval_metrics.json"),
        "zero_shot": _scores(finetune_dir / "zero_shot" / "eval_metrics.json"),
        "finetuned": finetuned,
    }
    return {
        "experiment": experiment,
        "overrides": common,
        "rows": rows,
        "budget": {
            "train_examples": data["train_examples"],
            "test_examples": data["test_examples"],
            "labels": data["labels"],
            "steps": train["steps"],
            "batch_size": batch,
            "epochs": round(train["steps"] * batch / data["train_examples"], 2),
            "train_seconds": train["train_seconds"],
            "run_wall_seconds": round(wall, 1),
        },
        "targets": {
            "beats_tfidf_same": finetuned["acc"] > rows["tfidf_same"]["acc"],
            "beats_tfidf_all": finetuned["acc"] > rows["tfidf_all"]["acc"],
        },
        "run_dir": str(finetune_dir),
        "export": str(finetune_dir / "export"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="lora_arxiv")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "accuracy")
    parser.add_argument("overrides", nargs="*", help=f"data overrides (default: data.path={SHARED_ARXIV})")
    a = parser.parse_args()
    overrides = a.overrides or ([f"data.path={SHARED_ARXIV}"] if a.experiment != "smoke" else [])
    print(json.dumps(bench(a.experiment, overrides, a.work), indent=2))
