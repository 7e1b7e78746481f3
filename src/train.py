"""Fine-tune a causal LM with LoRA/QLoRA: `python src/train.py experiment=qlora_arxiv`."""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from lmtune.core.cli import check_command_line  # noqa: E402
from lmtune.core.console import quiet_console  # noqa: E402
from lmtune.core.errors import UserError  # noqa: E402

quiet_console()

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    # torch, Lightning, transformers (seconds) only once Hydra has composed the config: a typo is reported at once
    from lmtune.training.train import optimized_metric, train

    try:
        metrics, _ = train(cfg)
        return optimized_metric(metrics, cfg.get("optimized_metric"))
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # one failed job: Hydra records it and runs the others (exiting here would end the whole sweep)
            log.error("job %s failed: %s", HydraConfig.get().job.num, e)
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
