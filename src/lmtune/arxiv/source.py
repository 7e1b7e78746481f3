"""The arXiv API as a source plug-in of training records (`data.fetch.source=arxiv_api`, the entry point
`lmtune.sources: arxiv_api`): one fetch per query into a cache file named by a hash of the query; a later run with the
same query reads that file (`data.fetch.query.refresh=true` fetches again)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.dataset import fetch_dataset
from lmtune.arxiv.feed import COLUMNS, ArxivApiError
from lmtune.arxiv.fetch import FetchPaths
from lmtune.core.digest import json_digest
from lmtune.core.errors import DataError

log = logging.getLogger(__name__)


class ArxivSource:
    """One arXiv query (`data.fetch.query`) fetched with the client settings (`data.fetch.client`, the `arxiv`
    config group) into `cache_dir/arxiv/`."""

    def __init__(self, options: Mapping, columns, cache_dir: Path):
        self.query = dict(options.get("query") or {})
        self.client_settings = dict(options.get("client") or {})
        if not self.query.get("categories"):
            raise DataError("data.source=arxiv_api needs data.fetch.query.categories, e.g. [cs.CL,cs.CV].")
        if not set(columns) <= set(COLUMNS):
            raise DataError(
                f"data.source=arxiv_api gives papers' title and abstract, but data.prompt.user reads "
                f"{', '.join(columns)}; use data=arxiv's prompt, or give your data with `data.path=`."
            )
        self.path = self.cached_path(cache_dir)

    @property
    def labels(self) -> list[str]:
        """The categories asked of the API: the natural label set of this source."""
        return list(self.query["categories"])

    def cached_path(self, cache_dir: Path) -> Path:
        """The cache file of this query: the same categories, dates, size and server give the same file."""
        key = {k: self.query.get(k) for k in ("categories", "max_results", "per_category", "date_from", "date_to")}
        key["base_url"] = self.client_settings.get("base_url")
        return cache_dir / "arxiv" / f"arxiv-{json_digest(key, 12)}.jsonl"

    def prepare(self) -> None:
        """Fetch from the arXiv API unless this query is cached."""
        paths = FetchPaths.for_output(self.path)
        if paths.out.is_file() and paths.manifest.is_file() and not self.query.get("refresh"):
            manifest = json.loads(paths.manifest.read_text())
            log.info(
                "using cached arXiv data %s (%d records fetched %s)",
                paths.out,
                manifest["count"],
                manifest["fetched_at"],
            )
            return
        client = ArxivClient(**self.client_settings)
        try:
            result = fetch_dataset(
                client,
                self.query["categories"],
                int(self.query.get("max_results", 1000)),
                paths.out,
                per_category=bool(self.query.get("per_category", True)),
                page_size=int(self.query.get("page_size", 100)),
                date_from=self.query.get("date_from"),
                date_to=self.query.get("date_to"),
            )
        except ArxivApiError as e:
            raise DataError(
                f"could not fetch training data from the arXiv API: {e}. A rerun resumes where this one "
                f"stopped. To train without network, use a local file: `data.path=<records.jsonl>` "
                f"(JSONL, CSV or Parquet with id, title, abstract, primary_category)."
            ) from None
        log.info("fetched %d arXiv records into %s", result.count, result.path)

    def wait_until_prepared(self, timeout: float = 3600.0, poll: float = 2.0) -> None:
        """Wait for another process (rank 0) to finish `prepare()`: its output is renamed into place whole."""
        if self.query.get("refresh"):
            return
        manifest = FetchPaths.for_output(self.path).manifest
        deadline = time.monotonic() + timeout
        if not manifest.is_file():
            log.info("waiting for rank 0 to fetch the arXiv data into %s", self.path)
        while not manifest.is_file():
            if time.monotonic() > deadline:
                raise DataError(
                    f"waited {timeout:.0f} s for rank 0 to fetch {self.path}; fetch it first with "
                    f"`python src/fetch_arxiv.py` (or train from `data.path=`) and start again."
                )
            time.sleep(poll)
