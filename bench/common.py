"""What every benchmark script shares: where things are, the project's config, and running a logged subprocess.

Importing it also sets PROJECT_ROOT (as `src/train.py` does), which `conf/paths` resolves paths against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED_ARXIV = ROOT.parent / "shared" / "data" / "arxiv" / "arxiv_cs.jsonl"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def project_config(name: str, overrides: list[str]) -> DictConfig:
    """`conf/<name>.yaml` composed with `overrides`, as the matching `src/` script would see it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(f"{name}.yaml", overrides=overrides)


def run_logged(cmd: list[str], log: Path) -> None:
    """Run `cmd` from the repository root with its output in `log` (bench/ importable, W&B offline); a failure
    raises with the log's last lines."""
    env = {**os.environ, "PYTHONPATH": str(BENCH), "WANDB_MODE": "offline", "PROJECT_ROOT": str(ROOT)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        shown = " ".join(str(c).replace(sys.executable, "python") for c in cmd[:3])
        raise RuntimeError(f"{shown} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def emit(result: dict, out: Path | None) -> dict:
    """A script's result: printed as JSON, and written to `out` when given."""
    if out:
        out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result
