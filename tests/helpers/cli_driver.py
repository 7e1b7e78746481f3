"""Run CLI commands one after another in one interpreter, as `python src/<script> <args>` would run each.

    python tests/helpers/cli_driver.py cases.json results.json

Each case (`{"script": "src/train.py", "args": [...]}`) runs the script as `__main__` with its own `sys.argv`;
its stdout and stderr are captured at the file-descriptor level (so logging handlers, rich and tracebacks are
all caught), and its exit status is what the interpreter would report: the code of `SystemExit`, 1 with the
message on stderr for `sys.exit("message")`, 1 with a printed traceback for any other exception. One process
for many cases saves the ~7 s of imports a fresh interpreter pays for each (torch, Lightning, transformers).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import time
import traceback


def run_case(script: str, args: list[str]) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [script, *args]
        status, started = 0, time.monotonic()
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            status = e.code if isinstance(e.code, int) else (1 if e.code else 0)
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            GlobalHydra.instance().clear()
        out.seek(0)
        err.seek(0)
        return {
            "returncode": status,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
            "seconds": time.monotonic() - started,
        }


def run_commands(commands: list[dict], workdir, tag: str, env: dict | None = None, preexec_fn=None) -> list[dict]:
    """Run `commands` (`{"script": ..., "args": [...]}`) in one fresh interpreter of this driver, from the
    repository root with W&B offline; returns each command's `returncode`, `stdout` and `stderr`."""
    import subprocess
    from pathlib import Path

    root, workdir = Path(__file__).resolve().parents[2], Path(workdir)
    (workdir / f"cases-{tag}.json").write_text(json.dumps(commands))
    # this checkout's package (runpy does not put src/ on the path), then tests/ for `conftest.<callback>` targets
    path = os.pathsep.join(str(root / folder) for folder in ("src", "tests"))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path, **(env or {})}
    env.pop("WANDB_API_KEY", None)
    driver = [sys.executable, __file__, workdir / f"cases-{tag}.json", workdir / f"results-{tag}.json"]
    proc = subprocess.run(driver, cwd=root, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / f"results-{tag}.json").read_text())


def main() -> None:
    cases_file, results_file = sys.argv[1:3]  # read first: every case replaces sys.argv
    cases = json.loads(open(cases_file).read())
    results = [run_case(case["script"], case["args"]) for case in cases]
    with open(results_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
