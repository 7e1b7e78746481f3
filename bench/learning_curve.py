"""The flagship result as a curve: test accuracy against the number of training papers and training seconds.

For each N (log scale) one user command fine-tunes the LM with the shipped recipe on the first N training papers
(hash order: a fixed, representative sample) for the recipe's number of passes (`trainer.max_steps` x batch /
`data.limit_train` of the experiment: 2 for lora_arxiv), and its end-of-training report scores TF-IDF + LR on
the same N papers and the zero-shot model on the same test split (400 papers, top-10 labels). TF-IDF + LR on the
whole train split is the horizontal reference. Every point's command is printed and kept in the results, so
anyone can rerun one point.

    python bench/learning_curve.py                       (N = 150, 600, 2400 on ../shared/data/arxiv)
    python bench/learning_curve.py --sizes 150 600       (stop where the machine's time runs out; rerun to extend)
    python bench/learning_curve.py --smoke --out /tmp/c  (tiny model, sample data, seconds: what the tests run)

The results file (`bench/results/<date>-<host>-curve.json`) is rewritten after every point, and a rerun with
the same settings keeps the points already measured, so a long curve can be built over several sessions.
Plots: `<results stem>-accuracy-vs-papers.png` and `-accuracy-vs-seconds.png` beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

from common import BENCH, ROOT, SHARED_ARXIV, project_config, run_logged
from omegaconf import OmegaConf

DEFAULT_SIZES = (150, 600, 2400)


def command(script: str, overrides: list[str]) -> str:
    """The command a user types for this point (paths relative to the repository when they are inside it)."""
    shown = [o.replace(str(ROOT) + "/", "") for o in overrides]
    return " ".join(["python", f"src/{script}", *map(shlex.quote, shown)])


def _scores(path: Path) -> dict:
    doc = json.loads(path.read_text())
    m = doc["metrics"]
    return {"acc": m["acc"], "macro_f1": m["macro_f1"], "n": m["n"]}


def _run(script: str, overrides: list[str], work: Path) -> float:
    started = time.perf_counter()
    run_logged([sys.executable, str(ROOT / "src" / script), *overrides, f"hydra.run.dir={work}"], work / "log.txt")
    return time.perf_counter() - started


def lm_point(
    n: int, experiment: str, data: list[str], batch_size: int, epochs: float, extra: list[str], work: Path
) -> dict:
    """Fine-tune on the first `n` training papers for `epochs` passes (the shipped recipe's); the report
    gives TF-IDF on the same papers and the zero-shot model beside it."""
    steps = max(1, math.ceil(epochs * n / batch_size))
    overrides = [
        f"experiment={experiment}",
        *data,
        f"data.limit_train={n}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",  # validate once, at the end: the time goes into training
        "trainer.check_val_every_n_epoch=null",
        "logger=csv",
        *extra,
    ]
    wall = _run("train.py", overrides, work)
    summary = json.loads((work / "metrics.json").read_text())
    train = summary["train"]
    return {
        "n": n,
        "command": command("train.py", overrides),
        "lm": {**_scores(work / "eval_metrics.json"), "steps": train["steps"]},
        "tfidf_same": _scores(work / "tfidf" / "eval_metrics.json"),
        "zero_shot": _scores(work / "zero_shot" / "eval_metrics.json"),
        "train_examples": summary["data"]["train_examples"],
        "train_seconds": train["train_seconds"],
        "train_tokens": train["tokens"],
        "tokens_per_s": train["tokens_per_s"],
        "precision": summary["precision"],
        "run_wall_seconds": round(wall, 1),
    }


def tfidf_all(experiment: str, data: list[str], work: Path) -> dict:
    overrides = [f"experiment={experiment}", *data, "baseline.train_on=all", "logger=none"]
    _run("baseline.py", overrides, work)
    doc = json.loads((work / "eval_metrics.json").read_text())
    return {**_scores(work / "eval_metrics.json"), "train_examples": doc["data"]["train_examples"],
            "command": command("baseline.py", overrides)}  # fmt: skip


def plot(results: dict, out: Path) -> list[Path]:
    """Accuracy vs training papers (log x) and vs training seconds, with the references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(results["points"], key=lambda p: p["n"])
    if not points:
        return []
    refs = [("TF-IDF + LR, all train papers", results.get("tfidf_all"), "tab:gray", "--")]
    refs.append(("zero-shot LM", points[0]["zero_shot"], "tab:red", ":"))
    paths = []
    machine = results["machine"]
    subtitle = f"{machine['cpu']} ({machine['cpu_capability']}), {points[0]['precision']}, {machine['date'][:10]}"
    for name, x_of, xlabel in [
        ("papers", lambda p: p["n"], "training papers (log scale)"),
        ("seconds", lambda p: p["train_seconds"], "training seconds (LM; log scale)"),
    ]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [x_of(p) for p in points]
        ax.plot(
            xs,
            [p["lm"]["acc"] for p in points],
            "o-",
            color="tab:blue",
            label=f"LM fine-tuned ({results['experiment']})",
        )
        if name == "papers":
            ax.plot(
                xs, [p["tfidf_same"]["acc"] for p in points], "s-", color="tab:green", label="TF-IDF + LR, same papers"
            )
        for label, ref, color, style in refs:
            if ref:
                ax.axhline(ref["acc"], color=color, linestyle=style, label=f"{label} ({ref['acc']:.3f})")
        for x, p in zip(xs, points, strict=True):
            ax.annotate(f"{p['lm']['acc']:.3f}", (x, p["lm"]["acc"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])  # the measured points, not powers of ten
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test accuracy ({points[0]['lm']['n']} papers)")
        ax.set_ylim(0, 1)
        ax.set_title(f"arXiv primary category: accuracy vs {name}\n{subtitle}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-accuracy-vs-{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def recipe(cfg) -> dict:
    """What every point of one curve shares besides N: a changed default (prompt, length, optimizer, adapter)
    starts a new curve instead of joining the old one's points."""
    keep = {"data": ["max_length", "prompt"], "optim": ["lr", "warmup_steps"], "adapter": ["kind", "r", "alpha",
            "target_modules", "quantization"], "model": ["source", "name_or_path", "gguf_file"]}  # fmt: skip

    def plain(node):  # only these keys resolved: others (paths) need a running Hydra app
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    return {group: {key: plain(cfg[group].get(key)) for key in keys} for group, keys in keep.items()}


def main(a) -> dict:
    from run import machine, machine_name  # the same machine record as `make bench`

    experiment = "smoke" if a.smoke else a.experiment
    data = [] if a.smoke else [f"data.path={a.data}"]
    cfg = project_config("train", [f"experiment={experiment}", *data, *a.overrides])
    batch_size = cfg.data.batch_size * cfg.trainer.get("accumulate_grad_batches", 1)  # papers per optimizer step
    sizes = sorted(a.sizes or ([8, 16] if a.smoke else DEFAULT_SIZES))
    # passes over the N papers: the experiment's own (max_steps x batch / limit_train) unless a candidate sets them
    epochs = a.epochs or (1.0 if a.smoke else cfg.trainer.max_steps * batch_size / cfg.data.limit_train)
    tag = f"-{a.tag}" if a.tag else ""
    out = a.out / f"{dt.date.today().isoformat()}-{machine_name()}-curve{tag}.json"
    settings = {
        "experiment": experiment,
        "data": data,
        "overrides": a.overrides,
        "batch_size": batch_size,
        "epochs": epochs,
        "recipe": recipe(cfg),
    }
    results = json.loads(out.read_text()) if out.is_file() else {"settings": settings, "points": []}
    if results.get("settings") != settings:  # never mix recipes in one curve, never overwrite another's points
        sys.exit(f"{out} holds a curve with other settings ({results.get('settings')}); give this one a --tag.")
    results.update(machine=machine(), file=str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
                   experiment=experiment)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    work = a.work / out.stem
    if "tfidf_all" not in results:
        results["tfidf_all"] = tfidf_all(experiment, data, work / "tfidf_all")
        print(f"[curve] TF-IDF + LR on all train papers: {results['tfidf_all']['acc']:.3f}", file=sys.stderr)
        save()
    done = {p["n"] for p in results["points"]}
    for n in sizes:
        if n in done:
            continue
        point = lm_point(n, experiment, data, batch_size, epochs, a.overrides, work / f"n{n}")
        print(f"[curve] {point['command']}", file=sys.stderr)
        print(
            f"[curve] N={n}: LM {point['lm']['acc']:.3f}, TF-IDF same papers {point['tfidf_same']['acc']:.3f}, "
            f"zero-shot {point['zero_shot']['acc']:.3f}; {point['train_seconds']:.0f} s of training",
            file=sys.stderr,
            flush=True,
        )
        results["points"] = sorted([*results["points"], point], key=lambda p: p["n"])
        save()
    results["plots"] = [str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in plot(results, out)]
    save()
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sample data: checks the script runs")
    parser.add_argument("--sizes", type=int, nargs="*", help=f"training papers per point (default {DEFAULT_SIZES})")
    parser.add_argument("--experiment", default="lora_arxiv")
    parser.add_argument("--data", type=Path, default=SHARED_ARXIV)
    parser.add_argument("--epochs", type=float, help="passes over the N papers (default: the experiment's own)")
    parser.add_argument("--tag", default="", help="names the results file of a recipe candidate: ...-curve-<tag>.json")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every fine-tune (a recipe candidate)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(main(parse()), indent=2))
