"""Data preparation as the file grows: seconds and peak memory of `setup("fit")` (read, label set, splits,
tokenization of every split) at increasing row counts: a first run on an empty data cache and a second run that
reads the cache (`lmtune.data.prepared`).

The file is the shared arXiv file repeated with new ids (`<id>-r<k>`), written once under `--work`; each run is
a fresh process (`python bench/data_scale.py --worker ...`), so its peak RSS is its own. Limits are lifted
(`data.limit_*=null`) so every example is tokenized, as a run on the whole file does.

    python bench/data_scale.py --rows 20000 200000           (CPU, SmolLM2's tokenizer, experiment=lora_arxiv)
    python bench/data_scale.py --smoke                       (the sample file, 2 sizes: what tests run)

It also measures training tokens/s at max_length 256 / 512 / 1024 on abstracts long enough to fill each length
(`lengths`; `bench/run.py --parts data` runs both).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, ROOT, SHARED_ARXIV, emit

SAMPLE = ROOT / "tests" / "assets" / "arxiv_sample.jsonl"
ALL_ROWS = ["data.limit_train=null", "data.limit_val=null", "data.limit_test=null"]


def repeated(source: Path, rows: int, out: Path) -> tuple[Path, int]:
    """`source` repeated (ids suffixed `-r<k>` from the second copy on) until it has at least `rows` rows."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    copies = -(-rows // len(lines))
    path = out / f"{source.stem}-x{copies}.jsonl"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for k in range(copies):
                for line in lines:
                    row = json.loads(line)
                    if k:
                        row["id"] = f"{row['id']}-r{k}"
                    f.write(json.dumps(row) + "\n")
        tmp.replace(path)
    return path, copies * len(lines)


def worker(overrides: list[str]) -> dict:
    """In a fresh process: compose the train config, prepare the data as `src/train.py` does, measure it."""
    from common import project_config

    from lmtune.model.loading import load_tokenizer, resolve_pretrained
    from lmtune.training.instantiate import instantiate_data

    cfg = project_config("train", overrides)
    tokenizer = load_tokenizer(resolve_pretrained(cfg.model, cfg.paths.cache_dir), cfg.model.get("pad_token"))
    cache = Path(cfg.data.cache_dir) / "data"
    before = set(cache.glob("*.arrow"))
    started = time.perf_counter()
    datamodule = instantiate_data(cfg.data)
    datamodule.prepare_data()
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "examples": {split: len(examples) for split, examples in datamodule.examples.items()},
        "records": datamodule.stats["records"],
        "new_cache_files": len(set(cache.glob("*.arrow")) - before),  # 0: everything came from the cache
    }


def measure(path: Path, experiment: str, extra: list[str], cache: Path) -> dict:
    cmd = [sys.executable, str(BENCH / "data_scale.py"), "--worker", f"experiment={experiment}", f"data.path={path}"]
    cmd.append(f"data.cache_dir={cache}")
    proc = subprocess.run([*cmd, *ALL_ROWS, *extra], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"failed": tail[0], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(sizes: list[int], source: Path, work: Path, experiment: str, extra: list[str]) -> dict:
    results = []
    for rows in sizes:
        path, actual = repeated(source, rows, work)
        cache = work / f"cache-{path.stem}"  # emptied first: the first run prepares, the second reads the cache
        shutil.rmtree(cache, ignore_errors=True)
        first, second = measure(path, experiment, extra, cache), measure(path, experiment, extra, cache)
        shutil.rmtree(cache, ignore_errors=True)
        row = {"rows": actual, "file_mb": round(path.stat().st_size / 1e6, 1), "first": first, "second": second}
        if "seconds" in first:
            row["ms_per_row_per_core"] = round(first["seconds"] * 1000 / actual * _cores(), 3)
        results.append(row)
        print(f"[data {actual} rows] first {first}, second {second}", file=sys.stderr, flush=True)
    return {"source": str(source), "experiment": experiment, "overrides": ALL_ROWS + extra, "sizes": results}


def long_rows(source: Path, out: Path, repeat: int = 4) -> Path:
    """`source` with each abstract repeated `repeat` times (~1,200 tokens), so every example fills max_length."""
    path = out / f"{source.stem}-long{repeat}.jsonl"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with source.open() as f, tmp.open("w") as g:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    g.write(json.dumps({**row, "abstract": " ".join([row["abstract"]] * repeat)}) + "\n")
        tmp.replace(path)
    return path


def lengths(max_lengths: list[int], source: Path, work: Path, steps: int, warmup: int, extra: list[str]) -> dict:
    """Training tokens/s with every example max_length tokens long (long abstracts, truncated): how the step's
    rate changes as attention's share grows with the length. One run each, LoRA, `src/train.py` as shipped."""
    import train_throughput

    path, results = long_rows(source, work), []
    for max_length in max_lengths:
        overrides = [
            *extra,
            f"data.path={path}",
            f"data.max_length={max_length}",
            "adapter=lora",
            f"trainer.max_steps={steps}",
        ]
        run = train_throughput.ours(overrides, work / f"length-{max_length}", warmup)
        keep = ("tokens_per_s", "steps_per_s", "process_peak_rss_mb", "padding_fraction", "precision")
        results.append({"max_length": max_length, **{k: run.get(k) for k in keep}})
        print(f"[data length {max_length}] {results[-1]}", file=sys.stderr, flush=True)
    return {"source": str(path), "overrides": extra, "steps": steps, "warmup_steps": warmup, "lengths": results}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[20000, 200000])
    parser.add_argument("--smoke", action="store_true", help="the sample file at 2 small sizes, tiny model")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "data_scale")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a, overrides = parser.parse_known_args(argv)
    if a.worker:
        print(json.dumps(worker(overrides)))
        return {}
    if a.smoke:
        result = bench([100, 200], SAMPLE, a.work, "smoke", overrides)
    else:
        result = bench(a.rows, SHARED_ARXIV, a.work, "lora_arxiv", overrides)
    return emit(result, a.out)


if __name__ == "__main__":
    main()
