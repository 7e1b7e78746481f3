"""TF-IDF + logistic regression on the LM's splits: `python src/baseline.py experiment=lora_arxiv`."""

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


@hydra.main(version_base="1.3", config_path="../conf", config_name="baseline.yaml")
def main(cfg: DictConfig) -> float:
    from lmtune.commands.baseline import run_baseline  # heavy: after Hydra has composed the config

    try:
        metrics = run_baseline(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    return metrics["acc"]  # what sweeps over baseline.C / min_df optimise


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
