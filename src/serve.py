"""Serve a trained export over HTTP: `python src/serve.py ckpt=<export> port=8000` (conf/serve.yaml)."""

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


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve.yaml")
def main(cfg: DictConfig) -> None:
    from lmtune.commands.serve import serve  # heavy: after Hydra has composed the config

    try:
        serve(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
