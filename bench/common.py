"""What every benchmark script shares: where things are, the project's config, running a logged subprocess, and
the record of the machine that measured.

Importing it also sets PROJECT_ROOT (as `src/train.py` does), which `conf/paths` resolves paths against.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import re
import socket
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
    """Run `cmd` from the repository root with its output in `log` (this checkout's src/ and bench/ importable, W&B
    offline); a failure raises with the log's last lines."""
    path = os.pathsep.join(str(folder) for folder in (ROOT / "src", BENCH))
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "PROJECT_ROOT": str(ROOT)}
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


def machine_name() -> str:
    """`<host>-<cpu>-<capability>[-bf16]`: results of different machines never share a file name."""
    from lmtune.model.precision import cpu_hardware

    hw = cpu_hardware()
    cpu = re.sub(r"\((r|tm)\)|\b(processor|cpu|core|with|radeon graphics)\b", "", hw.name.lower())
    parts = [socket.gethostname(), *re.findall(r"[a-z0-9]+", cpu), hw.capability.lower()]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts) + ("-bf16" if hw.native_bf16 else ""))


def machine() -> dict:
    """Host, CPU, precision `auto` picks, memory, GPU, versions and git commit: what a result file was measured on."""
    import torch

    from lmtune.model.precision import cpu_hardware, resolve_precision

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        sha, dirty = "", ""
    packages = ("torch", "transformers", "peft", "bitsandbytes", "lightning", "accelerate", "scikit-learn")
    hw = cpu_hardware()
    return {
        "host": socket.gethostname(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_capability": hw.capability,
        "cpu_native_bf16": hw.native_bf16,
        "auto_precision": resolve_precision("auto", "auto")[0],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {p: md.version(p) for p in packages},
        "git": sha.strip() + ("-dirty" if dirty.strip() else ""),
    }
