"""Evaluate a fine-tuned adapter or the zero-shot base model: `python src/eval.py ckpt=<export dir>`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from lmtune.core.cli import check_command_line  # noqa: E402
from lmtune.core.console import quiet_console  # noqa: E402
from lmtune.core.errors import UserError  # noqa: E402

quiet_console()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    from lmtune.commands.eval import run_eval  # heavy: after Hydra has composed the config

    try:
        run_eval(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
