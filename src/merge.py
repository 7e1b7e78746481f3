"""Merge a trained adapter into its base for shipping: `python src/merge.py ckpt=<run or export> out=<dir>`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from lmtune.core.console import quiet_console  # noqa: E402
from lmtune.core.errors import UserError  # noqa: E402

quiet_console()


@hydra.main(version_base="1.3", config_path="../conf", config_name="merge.yaml")
def main(cfg: DictConfig) -> None:
    from lmtune.artifacts.merge import merge_export  # heavy: after Hydra has composed the config

    try:
        out = merge_export(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote the merged model to {out}; load it with AutoModelForCausalLM.from_pretrained('{out}')")


if __name__ == "__main__":
    main()
