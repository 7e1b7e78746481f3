"""Fine-tune a causal LM with LoRA/QLoRA: `python src/train.py experiment=qlora_arxiv`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from lmtune.errors import UserError  # noqa: E402
from lmtune.pipeline import train  # noqa: E402
from lmtune.utils.metrics import optimized_metric  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    return optimized_metric(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
