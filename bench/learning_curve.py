"""The flagship result as a curve: test accuracy against the number of training papers and training seconds.

For each N (log scale) one user command fine-tunes the LM with the shipped recipe on the first N training papers
(hash order: a fixed, representative sample) for the recipe's number of passes (`trainer.max_steps` x batch /
`data.limit_train` of the experiment: 2 for lora_arxiv), but never for fewer steps than the recipe's own budget
(`trainer.max_steps`: 150). Below the experiment's N that is exactly what `experiment=lora_arxiv
data.limit_train=N` gives a user (more passes over fewer papers: two passes over 150 papers, 38 steps, are too
few to learn the labels); above it the steps grow to keep the passes. Its end-of-training report scores TF-IDF + LR on
the same N papers and the zero-shot model on the same test split (400 papers, top-10 labels). TF-IDF + LR on the
whole train split is the horizontal reference. Every point's command is printed and kept in the results, so
anyone can rerun one point.

    python bench/learning_curve.py                       (N = 150, 600, 2400 on ../shared/data/arxiv)
    python bench/learning_curve.py --sizes 150 600       (stop where the machine's time runs out; rerun to extend)
    python bench/learning_curve.py --smoke --out /tmp/c  (tiny model, sample data, seconds: what the tests run)
    python bench/learning_curve.py --compare bench/results/*-curve*.json   (recipes and machines on one plot)

The results file (`bench/results/<date>-<host>-curve.json`) is rewritten after every point, and a rerun with
the same settings keeps the points already measured, so a long curve can be built over several sessions.
Plots: `<results stem>-accuracy-vs-papers.png` and `-accuracy-vs-seconds.png` beside it; `--compare` draws
several curve files (recipes, machines) on one plot against training tokens, the compute measure that does
not change with the CPU: `<date>-curves-accuracy-vs-tokens.png`.
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

from common import BENCH, ROOT, SHARED_ARXIV, machine, machine_name, project_config, run_logged
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
    n: int, experiment: str, data: list[str], batch_size: int, epochs: float, min_steps: int, extra: list[str],
    work: Path,
) -> dict:  # fmt: skip
    """Fine-tune on the first `n` training papers for `epochs` passes (the shipped recipe's) and at least
    `min_steps` steps; the report gives TF-IDF on the same papers and the zero-shot model beside it."""
    steps = max(1, min_steps, math.ceil(epochs * n / batch_size))
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


def _pyplot():
    """pyplot on the Agg backend: the plots are files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(ax, title: str, legend_size: int, path: Path) -> Path:
    """What both kinds of plot share: accuracy from 0 to 1, grid, legend, title; then the PNG."""
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower right")
    ax.figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=110)
    _pyplot().close(ax.figure)
    return path


def plot(results: dict, out: Path) -> list[Path]:
    """Accuracy vs training papers (log x) and vs training seconds, with the references as horizontal lines."""
    plt = _pyplot()
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
        _, ax = plt.subplots(figsize=(6.4, 4.2))
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
        title = f"arXiv primary category: accuracy vs {name}\n{subtitle}"
        paths.append(_save(ax, title, 8, out.with_name(f"{out.stem}-accuracy-vs-{name}.png")))
    return paths


def curve_label(results: dict) -> str:
    """`<label, tag or experiment>: <CPU> (<capability>), <precision>`: what tells two curves of one plot apart
    (a file's optional "label" names a recipe that neither its tag nor its experiment describes)."""
    stem = Path(results["file"]).stem
    name = results.get("label") or (stem.split("-curve-", 1)[1] if "-curve-" in stem else results["experiment"])
    machine = results["machine"]
    precision = results["points"][0]["precision"] if results["points"] else "?"
    return f"{name}: {machine['cpu']} ({machine['cpu_capability']}), {precision}"


def compare(files: list[Path], out: Path) -> tuple[Path, list[dict]]:
    """Several curves (recipes, machines) on one plot of accuracy against training tokens.

    Tokens, not seconds: a token costs the same on every machine and for every recipe here, while seconds
    differ between CPUs (and drifted 1.6x on one VM between sessions). Each point is labelled N x passes."""
    series = []
    for file in files:
        try:
            results = json.loads(Path(file).read_text())
            batch = results["settings"]["batch_size"]
            points = [{"n": p["n"], "passes": p["lm"]["steps"] * batch / p["n"], "tokens": p["train_tokens"],
                       "acc": p["lm"]["acc"]} for p in results["points"]]  # fmt: skip
            series.append({"file": str(file), "label": curve_label(results), "tfidf_all": results.get("tfidf_all"),
                           "test_papers": results["points"][0]["lm"]["n"],
                           "points": sorted(points, key=lambda p: p["tokens"])})  # fmt: skip
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            sys.exit(f"error: {file} is not a learning-curve results file ({type(e).__name__}: {e}); "
                     "pass files written by bench/learning_curve.py (bench/results/*-curve*.json)")  # fmt: skip
    _, ax = _pyplot().subplots(figsize=(7.2, 4.6))
    for i, s in enumerate(series):
        xs, ys = [p["tokens"] for p in s["points"]], [p["acc"] for p in s["points"]]
        (line,) = ax.plot(xs, ys, "o-", label=s["label"])
        for p in s["points"]:  # labels above the points, every other curve's below: equal tokens stay readable
            text = f"{p['n']:,}x{p['passes']:.2g}: {p['acc']:.3f}"
            ax.annotate(text, (p["tokens"], p["acc"]), textcoords="offset points", xytext=(0, 6 if i % 2 else -11),
                        ha="center", fontsize=7, color=line.get_color())  # fmt: skip
    references = sorted({round(s["tfidf_all"]["acc"], 4) for s in series if s["tfidf_all"]})
    for acc in references:  # one line per distinct value: the same fit differs by a few papers between CPUs
        ax.axhline(acc, color="tab:gray", linestyle="--", linewidth=0.8)
    if references:
        ax.plot([], [], color="tab:gray", linestyle="--", label="TF-IDF + LR, all train papers ("
                + " / ".join(f"{a:.3f}" for a in references) + ")")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (real, padding excluded; log scale)")
    ax.set_ylabel(f"test accuracy ({' / '.join(sorted({str(s['test_papers']) for s in series}))} papers)")
    title = "arXiv primary category: recipes and machines by training tokens\n(labels: N papers x passes)"
    return _save(ax, title, 7, out), series


def recipe(cfg) -> dict:
    """What every point of one curve shares besides N: a changed default (prompt, length, optimizer, adapter)
    starts a new curve instead of joining the old one's points."""
    keep = {"data": ["max_length", "prompt"], "optim": ["lr", "warmup_steps"], "adapter": ["kind", "r", "alpha",
            "target_modules", "quantization"], "model": ["source", "name_or_path", "gguf_file"]}  # fmt: skip

    def plain(node):  # only these keys resolved: others (paths) need a running Hydra app
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    return {group: {key: plain(cfg[group].get(key)) for key in keys} for group, keys in keep.items()}


def main(a) -> dict:
    if a.compare:
        path, _ = compare(a.compare, a.out / f"{dt.date.today().isoformat()}-curves-accuracy-vs-tokens.png")
        print(f"[curve] {path}", file=sys.stderr)
        return {"plot": str(path)}

    experiment = "smoke" if a.smoke else a.experiment
    data = [] if a.smoke else [f"data.path={a.data}"]
    cfg = project_config("train", [f"experiment={experiment}", *data, *a.overrides])
    batch_size = cfg.data.batch_size * cfg.trainer.get("accumulate_grad_batches", 1)  # papers per optimizer step
    sizes = sorted(a.sizes or ([8, 16] if a.smoke else DEFAULT_SIZES))
    # passes over the N papers: the experiment's own (max_steps x batch / limit_train) unless a candidate sets them
    epochs = a.epochs or (1.0 if a.smoke else cfg.trainer.max_steps * batch_size / cfg.data.limit_train)
    # and never fewer steps than the recipe's own budget: a small N gets more passes, as the shipped command gives it
    min_steps = a.min_steps if a.min_steps is not None else (0 if a.smoke else cfg.trainer.max_steps)
    tag = f"-{a.tag}" if a.tag else ""
    out = a.out / f"{dt.date.today().isoformat()}-{machine_name()}-curve{tag}.json"
    settings = {
        "experiment": experiment,
        "data": data,
        "overrides": a.overrides,
        "batch_size": batch_size,
        "epochs": epochs,
        "min_steps": min_steps,
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
        point = lm_point(n, experiment, data, batch_size, epochs, min_steps, a.overrides, work / f"n{n}")
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
    parser.add_argument("--min-steps", type=int, help="fewest steps per point (default: the experiment's max_steps)")
    parser.add_argument("--tag", default="", help="names the results file of a recipe candidate: ...-curve-<tag>.json")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="CURVE_JSON",
                        help="plot these curve files together by training tokens; measures nothing")  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every fine-tune (a recipe candidate)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(main(parse()), indent=2))
