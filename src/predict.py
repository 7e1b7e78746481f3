"""Predict labels with a trained export: `python src/predict.py ckpt=<export> input=rows.jsonl` (conf/predict.yaml)."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from lmtune.arxiv.lookup import verbatim_ids  # noqa: E402
from lmtune.core.cli import check_command_line  # noqa: E402
from lmtune.core.console import quiet_console  # noqa: E402
from lmtune.core.errors import UserError  # noqa: E402

quiet_console()


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict.yaml")
def main(cfg: DictConfig) -> None:
    from lmtune.commands.predict import predict  # heavy: after Hydra has composed the config

    ids = verbatim_ids(HydraConfig.get().overrides.task)
    if ids is not None:
        with open_dict(cfg):
            cfg.arxiv_id = ids
    try:
        predict(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
