"""Collect arXiv papers into a JSONL training file: `python src/fetch_arxiv.py categories=[cs.CL,cs.CV]`."""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from lmtune.arxiv.client import ArxivClient  # noqa: E402
from lmtune.arxiv.dataset import fetch_dataset  # noqa: E402
from lmtune.core.console import quiet_console  # noqa: E402
from lmtune.core.errors import UserError  # noqa: E402

quiet_console()

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="fetch_arxiv.yaml")
def main(cfg: DictConfig) -> None:
    client = ArxivClient(**OmegaConf.to_container(cfg.arxiv, resolve=True))
    try:
        result = fetch_dataset(
            client,
            list(cfg.categories),
            cfg.max_results,
            cfg.out,
            per_category=cfg.per_category,
            page_size=cfg.page_size,
            date_from=cfg.date_from,
            date_to=cfg.date_to,
        )
    except (UserError, ValueError) as e:  # API errors, bad categories or dates
        sys.exit(f"error: {e}")
    log.info(
        "%d records (%d duplicates dropped) in %s; %d requests",
        result.count,
        result.duplicates_dropped,
        result.path,
        client.requests_made,
    )
    print(f"wrote {result.count} records to {result.path}")


if __name__ == "__main__":
    main()
