"""What every entry point checks before Hydra starts work: a command line Hydra cannot parse, and an output
folder that cannot be written."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmtune.core.files import check_writable


def check_command_line(args: list[str]) -> None:
    """Hydra cannot parse an unquoted value with `<` or `>` (special tokens such as `<|eot_id|>`) and answers with a
    lexer error that does not say how to write it; this says it in one line, before Hydra starts."""
    for arg in args:
        key, sep, value = arg.partition("=")
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
