"""Where training records come from: a local file, a Hugging Face dataset, or the arXiv API (`arxiv.source`).

`data.source=auto` (the default) picks `file` when `data.path` is set, `hf` when `data.hf_name` is set,
and otherwise `arxiv_api` when the task has an arXiv query (`data=arxiv`), so
`python src/train.py experiment=qlora_arxiv` works from nothing on a machine with network. Downloading happens
in `prepare()` (Lightning's `prepare_data`), reading in `rows()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from lmtune.arxiv.source import ArxivSource
from lmtune.core.errors import DataError
from lmtune.data.records import RecordSpec, existing_file, reader_for

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
    """One configured source of records; `rows()` gives the raw rows, read as the task's records."""

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
        self.hf = {"name": hf_name, "config": hf_config, "split": hf_split, "revision": hf_revision}
        self.download: ArxivSource | None = None  # a source fetched before it is read
        if self.kind == "file" and self.path is None:
            raise DataError("data.source=file needs `data.path=` (a JSONL, CSV or Parquet file, optionally .gz).")
        if self.kind == "hf" and not hf_name:
            raise DataError("data.source=hf needs `data.hf_name=` (a hub dataset id or a local dataset folder).")
        if self.kind == "arxiv_api":
            self.download = ArxivSource(arxiv_query, arxiv, spec.text, Path(cache_dir or ".cache"))
            self.path = self.download.path

    @property
    def where(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.hf['name']}[{self.hf['split']}]"
        return str(self.path)

    @property
    def natural_labels(self) -> list[str] | None:
        """The label set the source itself names (what a downloaded source was asked for), if it names one."""
        return self.download.categories if self.download else None

    def prepare(self) -> None:
        """Download what a downloaded source needs unless it is cached; other sources need no download step."""
        if self.download:
            self.download.prepare()

    def wait_until_prepared(self, timeout: float = 3600.0, poll: float = 2.0) -> None:
        """Wait for another process (rank 0) to finish `prepare()`."""
        if self.download:
            self.download.wait_until_prepared(timeout, poll)

    def rows(self) -> tuple[Iterable[Mapping], str, dict]:
        """(the source's raw rows, `where` naming it in errors, what identifies its content): a file by its path,
        inode, size, modification and change times, a HF dataset by its fingerprint. Prepared data is cached under
        that key. The change time (ctime) moves with every write and cannot be set back by a user (`touch -d` and
        `os.utime` set only mtime), so a file edited in place with its size and mtime restored is read again; the
        check is one stat (a content hash of a 1M-row file would cost seconds per run)."""
        if self.kind == "hf":
            from lmtune.data.hf_source import iter_hf_rows

            rows, where, fingerprint = iter_hf_rows(**self.hf, spec=self.spec)
            return rows, where, {"hf": self.hf, "fingerprint": fingerprint}
        if self.download and not self.path.is_file():
            self.prepare()
        path = existing_file(self.path, self.spec)
        stat = path.stat()
        key = {
            "file": str(path.resolve()),
            "inode": stat.st_ino,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns,
        }
        return reader_for(path)(path, self.spec), str(path), key
