"""A generate recipe's learning curve: the fine-tuned model's written answers against the zero-shot model's, at
growing numbers of training examples (one pass each), on the shared arXiv file.

For each N one user command trains `experiment=<recipe> data.limit_train=N` (the recipe's own settings otherwise,
with the shared file's 5% val and test splits) and its end-of-training report has the fine-tuned and the zero-shot
model write the same test answers (the zero-shot answers are cached: computed once for the curve). Every point's
command is printed and kept in the results.

    python bench/generate_curve.py                                  (arxiv_titles, N = 300, 1000, 3000)
    python bench/generate_curve.py --recipe arxiv_chat --sizes 300 1000
    python bench/generate_curve.py --smoke --out /tmp/c             (tiny model, sample data, seconds)

The results file (`bench/results/<date>-<machine>-<recipe>-curve.json`) is rewritten after every point; a rerun with
the same settings keeps the points already measured.
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

DEFAULT_SIZES = (300, 1000, 3000)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="arxiv_titles")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--limit-test", type=int, default=100, help="test conversations each model answers")
    parser.add_argument("--data", default=str(SHARED_ARXIV))
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the sample: what the tests run")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "generate_curve")
    return parser.parse_args(argv)


def overrides(args, n: int) -> list[str]:
    common = [f"experiment={args.recipe}", "logger=none", f"data.limit_train={n}", f"data.limit_test={args.limit_test}"]
    if args.smoke:
        return [
            *common,
            "model=tiny_random",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "report.max_new_tokens=8",
        ]
    return [*common, f"data.path={args.data}", "data.val_fraction=0.05", "data.test_fraction=0.05"]


def main(args) -> dict:
    if not args.smoke and not Path(args.data).is_file():
        sys.exit(f"{args.data}: not found; give --data <the arXiv JSONL> or --smoke")
    name = "smoke" if args.smoke else machine_name()
    out = args.out / f"{dt.date.today()}-{name}-{args.recipe}-curve.json"
    doc = json.loads(out.read_text()) if out.is_file() else {"machine": machine(), "recipe": args.recipe, "points": []}
    done = {p["limit_train"] for p in doc["points"]}
    for n in args.sizes:
        if n in done:
            continue
        settings = overrides(args, n)
        shown = " ".join(
            ["python", "src/train.py", *map(shlex.quote, [o.replace(str(ROOT) + "/", "") for o in settings])]
        )
        print(shown, flush=True)
        work = args.work / args.recipe / str(n)
        started = time.perf_counter()
        run_logged(
            [sys.executable, str(ROOT / "src" / "train.py"), *settings, f"hydra.run.dir={work}"], work / "log.txt"
        )
        summary = json.loads((work / "metrics.json").read_text())
        report = summary.get("report", {})
        point = {
            "limit_train": n,
            "command": shown,
            "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": summary["train"].get("train_seconds"),
            "train_examples": summary["data"]["train_examples"],
            "test_examples": summary["data"]["test_examples"],
            "val_loss": summary["val"].get("val/loss"),
            "test_loss": summary["test"].get("test/loss"),
            "precision": summary["precision"],
            **{k.removeprefix("report/"): v for k, v in report.items()},
        }
        general = summary.get("forgetting", {})
        for model in ("base", "fine-tuned"):
            if model in general:
                point[f"general_text/{model}_loss"] = general[model]["loss"]
        doc["points"].append(point)
        doc["points"].sort(key=lambda p: p["limit_train"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        print(json.dumps({k: point[k] for k in point if k != "command"}), flush=True)
    return doc


if __name__ == "__main__":
    main(parse())
