"""What every entry point checks before Hydra starts work: a command line Hydra cannot parse, and an output
folder that cannot be written."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmtune.core.files import check_writable
from lmtune.core.secrets import is_secret_key

# where a secret setting comes from instead of the command line
FROM_ENVIRONMENT = {"serve.api_key": "LMTUNE_API_KEY=<key> python src/serve.py ..."}


def check_command_line(args: list[str]) -> None:
    """Hydra cannot parse an unquoted value with `<` or `>` (special tokens such as `<|eot_id|>`) and answers with a
    lexer error that does not say how to write it; this says it in one line, before Hydra starts. A secret typed as
    a value (`serve.api_key=abc`) is refused before Hydra writes it in clear into the run's .hydra/ folder (and the
    shell keeps it in its history); one read from the environment (`'+secrets.token=${oc.env:MY_TOKEN}'`) passes."""
    for arg in args:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~")
        if sep and is_secret_key(name) and value and not value.strip("'\"").startswith("${oc.env:"):
            fix = FROM_ENVIRONMENT.get(name, f"'{key}=${{oc.env:YOUR_VARIABLE}}' with the secret in YOUR_VARIABLE")
            sys.exit(
                f"error: {key}=***: a secret is not taken on the command line (Hydra writes it in clear into the "
                f"run's .hydra/ folder); give it from the environment: {fix}"
            )
        if sep and ("<" in value or ">" in value) and not value.startswith(("'", '"', "{", "[")):
            sys.exit(f"error: {arg}: Hydra reads < and > only inside quotes; write it as \"{key}='{value}'\".")


class CheckOutputWritable(Callback):
    """Before Hydra writes anything into the run folder: a read-only, full or blocked output folder is one line
    (exit status 1) instead of a traceback from the first logger or checkpoint that tries."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config, setting: str) -> None:
        problem = check_writable(Path(OmegaConf.select(config, setting)), setting)
        if problem:
            sys.exit(f"error: {problem}")
