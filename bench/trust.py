"""What a classifier's predictions are worth on the shared arXiv file, split at random and by time: one training run
per setting, each a printed user command, and from its report the accuracy and macro-F1 with their 95% intervals,
TF-IDF + LR's beside them (trained on the same papers, and on every training paper of the split), McNemar's tests,
the calibration error before and after temperature scaling, the label sets' coverage and size, accuracy at 80% and
90% of rows answered, how often the answer is one of the paper's categories, and each split's dates.

    python bench/trust.py                                          (lora_arxiv: random, then time)
    python bench/trust.py --splits time --tag balanced loss.class_weights=balanced
    python bench/trust.py --smoke --out /tmp/t                     (tiny model, the sample: seconds)

The results file (`bench/results/<date>-<machine>-trust-<recipe>[-tag].json`) is rewritten after every run; a rerun
keeps the settings already measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

from common import BENCH, ROOT, SHARED_ARXIV, machine, machine_name, run_logged

from lmtune.evaluation.comparison import mcnemar


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lora_arxiv")
    parser.add_argument("--splits", nargs="+", default=["random", "time"], choices=["random", "time"])
    parser.add_argument("--data", default=str(SHARED_ARXIV))
    parser.add_argument("--tag", default="", help="names a variant (its overrides follow the options)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the sample: what the tests run")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "trust")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. loss.class_weights=balanced")
    return parser.parse_args(argv)


def overrides(args, split: str) -> list[str]:
    recipe = "smoke" if args.smoke else args.recipe
    common = [f"experiment={recipe}", "logger=none", f"data.split={split}", "data.date_column=published"]
    if args.smoke:
        return [*common, *args.overrides]
    return [*common, f"data.path={args.data}", *args.overrides]


def row_of(report_md: str, prefix: str) -> str | None:
    return next((line for line in report_md.splitlines() if line.startswith(prefix)), None)


def measured(work: Path) -> dict:
    """The numbers of one run, from the files it wrote."""
    summary = json.loads((work / "metrics.json").read_text())
    tuned = json.loads((work / "eval_metrics.json").read_text())["metrics"]
    tfidf = json.loads((work / "tfidf" / "eval_metrics.json").read_text())["metrics"]
    report = summary.get("report", {})
    keep = (
        "acc",
        "acc_interval",
        "macro_f1",
        "macro_f1_interval",
        "ece",
        "ece_uncalibrated",
        "ece_floor",
        "temperature",
    )
    return {
        "train_seconds": summary["train"].get("train_seconds"),
        "precision": summary["precision"],
        "data": {k: summary["data"].get(k) for k in ("train_examples", "val_examples", "test_examples", "dates")},
        "fine_tuned": {
            **{k: tuned[k] for k in keep if k in tuned},
            "sets": tuned.get("sets"),
            "acc_at_coverage": tuned.get("acc_at_coverage"),
            "acc_any_label": tuned.get("acc_any_label"),
        },
        "tfidf_same_papers": {k: tfidf[k] for k in ("acc", "acc_interval", "macro_f1", "macro_f1_interval")},
        "vs_tfidf": {
            "p_value": report.get("report/vs_tfidf/p_value"),
            "verdict": report.get("report/vs_tfidf/verdict"),
        },
    }


def tfidf_all_rows(args, split: str, work: Path) -> dict:
    """TF-IDF + LR on every training paper of the split, scored on the same test papers (`src/baseline.py`)."""
    settings = [*overrides(args, split), "baseline.train_on=all", f"hydra.run.dir={work}"]
    run_logged([sys.executable, str(ROOT / "src" / "baseline.py"), *settings], work / "log.txt")
    metrics = json.loads(next(work.rglob("eval_metrics.json")).read_text())
    m = metrics["metrics"]
    return {
        "train_examples": metrics.get("train_examples"),
        "acc": m["acc"],
        "acc_interval": m["acc_interval"],
        "mcnemar_fine_tuned_vs_this": paired(work.parent / "predictions.jsonl", next(work.rglob("predictions.jsonl"))),
    }


def paired(fine_tuned: Path, other: Path) -> dict:
    """McNemar's test of the fine-tuned model against another on the same test rows (`a_only`: fine-tuned only)."""
    read = lambda path: {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}  # noqa: E731
    a, b = read(fine_tuned), read(other)
    ids = sorted(a)
    assert set(ids) == set(b), f"{fine_tuned} and {other} score different rows"
    return mcnemar([a[i]["true"] for i in ids], [a[i]["predicted"] for i in ids], [b[i]["predicted"] for i in ids])


def main(args) -> dict:
    if not args.smoke and not Path(args.data).is_file():
        sys.exit(f"{args.data}: not found; give --data <the arXiv JSONL> or --smoke")
    name = "smoke" if args.smoke else machine_name()
    tag = f"-{args.tag}" if args.tag else ""
    out = args.out / f"{dt.date.today()}-{name}-trust-{args.recipe}{tag}.json"
    doc = json.loads(out.read_text()) if out.is_file() else {"machine": machine(), "recipe": args.recipe, "runs": {}}
    for split in args.splits:
        if split in doc["runs"]:
            continue
        settings = overrides(args, split)
        shown = " ".join(
            ["python", "src/train.py", *map(shlex.quote, [o.replace(str(ROOT) + "/", "") for o in settings])]
        )
        print(shown, flush=True)
        work = args.work / f"{args.recipe}{tag}" / split
        started = time.perf_counter()
        run_logged(
            [sys.executable, str(ROOT / "src" / "train.py"), *settings, f"hydra.run.dir={work}"], work / "log.txt"
        )
        run = {"command": shown, "seconds": round(time.perf_counter() - started, 1), **measured(work)}
        run["tfidf_all_training_rows"] = tfidf_all_rows(args, split, work / "tfidf_all")
        doc["runs"][split] = run
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        print(json.dumps({k: v for k, v in run.items() if k != "command"}), flush=True)
    return doc


if __name__ == "__main__":
    main(parse())
