"""Where training records come from: a local file, a Hugging Face dataset, or (arXiv tasks) the arXiv API.

`data.source=auto` (the default) picks `file` when `data.path` is set, `hf` when `data.hf_name` is set,
and otherwise `arxiv_api` when the task has an arXiv query (`data=arxiv`), so
`python src/train.py experiment=qlora_arxiv` works from nothing on a machine with network. The arXiv source
fetches once into a file under `paths.cache_dir/arxiv/` named
by a hash of the query; a later run with the same query reads that file (`refresh=true` fetches again).
Downloading happens in `prepare()` (Lightning's `prepare_data`), reading in `read()`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from lmtune.data.arxiv_api import ArxivApiError, ArxivClient, FetchPaths, fetch_dataset
from lmtune.data.records import DataError, RecordSpec, existing_file, json_digest, reader_for

log = logging.getLogger(__name__)

SOURCES = ("auto", "file", "arxiv_api", "hf")


def resolve_source(source: str, path: str | None, hf_name: str | None, arxiv_query: Mapping | None = None) -> str:
    """The concrete source for `auto`: a given file, else a given HF dataset, else the arXiv API (arXiv tasks)."""
    if source not in SOURCES:
        raise DataError(f"data.source={source!r}: use one of {', '.join(SOURCES)}.")
    if source != "auto":
        return source
    if not (path or hf_name or arxiv_query):
        raise DataError(
            "no data: set `data.path=` (a JSONL, CSV or Parquet file, optionally .gz) or `data.hf_name=` "
            "(a Hugging Face dataset)."
        )
    return "file" if path else "hf" if hf_name else "arxiv_api"


class RecordSource:
    """One configured source of records; `read()` returns validated records (skips counted)."""

    def __init__(
        self,
        spec: RecordSpec,
        source: str = "auto",
        path: str | None = None,
        arxiv_query: Mapping | None = None,
        arxiv: Mapping | None = None,
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_revision: str | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.kind = resolve_source(source, path, hf_name, arxiv_query)
        self.path = Path(path) if path else None
        self.spec = spec
        self.query = dict(arxiv_query or {})
        self.client_settings = dict(arxiv or {})
        self.hf = {"name": hf_name, "config": hf_config, "split": hf_split, "revision": hf_revision}
        if self.kind == "file" and self.path is None:
            raise DataError("data.source=file needs `data.path=` (a JSONL, CSV or Parquet file, optionally .gz).")
        if self.kind == "hf" and not hf_name:
            raise DataError("data.source=hf needs `data.hf_name=` (a hub dataset id or a local dataset folder).")
        if self.kind == "arxiv_api":
            if not self.query.get("categories"):
                raise DataError("data.source=arxiv_api needs data.arxiv_query.categories, e.g. [cs.CL,cs.CV].")
            if not set(spec.text) <= {"title", "abstract"}:
                raise DataError(
                    f"data.source=arxiv_api gives papers' title and abstract, but data.prompt.user reads "
                    f"{', '.join(spec.text)}; use data=arxiv's prompt, or give your data with `data.path=`."
                )
            self.path = self.cached_path(Path(cache_dir or ".cache"))

    @property
    def where(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.hf['name']}[{self.hf['split']}]"
        return str(self.path)

    @property
    def categories(self) -> list[str] | None:
        """The categories asked of the arXiv API: the natural label set of that source."""
        return list(self.query["categories"]) if self.kind == "arxiv_api" else None

    def cached_path(self, cache_dir: Path) -> Path:
        """The cache file of this query: the same categories, dates, size and server give the same file."""
        key = {k: self.query.get(k) for k in ("categories", "max_results", "per_category", "date_from", "date_to")}
        key["base_url"] = self.client_settings.get("base_url")
        return cache_dir / "arxiv" / f"arxiv-{json_digest(key, 12)}.jsonl"

    def prepare(self) -> None:
        """Fetch from the arXiv API unless this query is cached; other sources need no download step."""
        if self.kind != "arxiv_api":
            return
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
        if self.kind != "arxiv_api" or self.query.get("refresh"):
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

    def rows(self) -> tuple[Iterable[Mapping], str, dict]:
        """(the source's raw rows, `where` naming it in errors, what identifies its content): a file by its path,
        size and modification time, a HF dataset by its fingerprint. Prepared data is cached under that key."""
        if self.kind == "hf":
            from lmtune.data.hf_source import iter_hf_rows

            rows, where, fingerprint = iter_hf_rows(**self.hf, spec=self.spec)
            return rows, where, {"hf": self.hf, "fingerprint": fingerprint}
        if self.kind == "arxiv_api" and not self.path.is_file():
            self.prepare()
        path = existing_file(self.path, self.spec)
        stat = path.stat()
        key = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return reader_for(path)(path, self.spec), str(path), key
