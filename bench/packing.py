"""What packing buys: real (non-padding) tokens per second of training, packed against unpacked, on a realistic mix
of lengths (the arxiv_titles recipe on the shared arXiv file: abstracts of 100 to 380 tokens), side by side.

Four settings, each the same user command but for `data.packing` and `data.group_by_length`, run alternately
`--runs` times each (medians reported): unpacked with length-grouped batches (the default), unpacked random
batches, packed random batches, packed length-grouped batches. A step holds the same examples packed or not, so
the loss is the same (tests/test_conversations.py); only the padding and the attention's row length differ.

    python bench/packing.py                       (SmolLM2-135M, 40 steps of 8, 2 runs each)
    python bench/packing.py --smoke --out /tmp/p  (tiny model, the sample: seconds)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

from common import BENCH, ROOT, SHARED_ARXIV, machine, machine_name, run_logged

SETTINGS = {
    "unpacked, length-grouped (default)": ["data.packing=false", "data.group_by_length=true"],
    "unpacked, random batches": ["data.packing=false", "data.group_by_length=false"],
    "packed, random batches": ["data.packing=true", "data.group_by_length=false"],
    "packed, length-grouped": ["data.packing=true", "data.group_by_length=true"],
}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "packing")
    return parser.parse_args(argv)


def command(args, setting: list[str]) -> list[str]:
    common = [
        "experiment=arxiv_titles",
        "logger=none",
        "report.enabled=false",
        "callbacks.early_stopping=null",
        "trainer.limit_val_batches=0",
        "+trainer.limit_test_batches=0",
        "optimized_metric=null",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        "compile=false",
    ]
    data = ["model=tiny_random"] if args.smoke else [f"data.path={SHARED_ARXIV}", "data.limit_train=2000"]
    return [*common, *data, *setting]


def main(args) -> dict:
    runs = {name: [] for name in SETTINGS}
    for r in range(args.runs):
        for name, setting in SETTINGS.items():  # alternating, so a drift of the machine hits every setting alike
            work = args.work / f"{list(SETTINGS).index(name)}-{r}"
            cmd = [sys.executable, str(ROOT / "src" / "train.py"), *command(args, setting), f"hydra.run.dir={work}"]
            run_logged(cmd, work / "log.txt")
            train = json.loads((work / "metrics.json").read_text())["train"]
            runs[name].append({k: train[k] for k in ("tokens_per_s", "padding_fraction", "train_seconds", "steps")})
            print(name, runs[name][-1], flush=True)
    median = {name: statistics.median(x["tokens_per_s"] for x in xs) for name, xs in runs.items()}
    base = median["unpacked, length-grouped (default)"]
    result = {
        "machine": machine(),
        "command": "python src/train.py " + " ".join(command(args, [])).replace(str(ROOT) + "/", ""),
        "runs": runs,
        "median_tokens_per_s": median,
        "ratio_to_default": {name: round(v / base, 3) for name, v in median.items()},
        "ratio_packed_to_unpacked_random": round(
            median["packed, random batches"] / median["unpacked, random batches"], 3
        ),
    }
    name = "smoke" if args.smoke else machine_name()
    out = args.out / f"{dt.date.today()}-{name}-packing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "ratio_to_default")}, indent=1))
    return result


if __name__ == "__main__":
    main(parse())
