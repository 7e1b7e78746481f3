"""Run what an export's model card (README.md) tells a user to run: its bash line and its Python code."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def card_command(export: Path) -> str:
    """The card's `python src/predict.py ...` line, with `<this folder>` filled in."""
    card = (export / "README.md").read_text()
    (line,) = re.findall(r"```bash\n(python src/predict\.py .*)\n```", card)
    return line.replace("<this folder>", shlex.quote(str(export)))


def run_card_command(export: Path, *settings: str) -> subprocess.CompletedProcess:
    """The card's command from the repository root, as a user's shell runs it; `settings` are appended (where
    the test's logs and caches go)."""
    command = " ".join([card_command(export), *map(shlex.quote, settings)])
    # `python` is this interpreter, as in a shell where the project's environment is active
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_card_code(export: Path) -> str:
    """The card's Python code, run in the export folder ("this folder"); returns what it prints."""
    code = re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S)[1]
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(export)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(export / "README.md"), "exec"), {"__name__": "__card__"})
    finally:
        os.chdir(cwd)
        sys.stdout.flush()
    return printed.getvalue()
