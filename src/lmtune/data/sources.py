"""Where training records come from: a local file, a Hugging Face dataset, or a source plug-in that fetches them
(`data.fetch`; the arXiv API is one: `lmtune.arxiv.source`).

`data.source=auto` (the default) picks `file` when `data.path` is set, `hf` when `data.hf_name` is set, and
otherwise the plug-in `data.fetch.source` names (`data=arxiv`: arxiv_api), so `python src/train.py
experiment=qlora_arxiv` works from nothing on a machine with network. Downloading happens in `prepare()`
(Lightning's `prepare_data`), reading in `rows()`.

A source plug-in is a class registered under the entry-point group `lmtune.sources` (`arxiv_api =
"lmtune.arxiv.source:ArxivSource"` in pyproject.toml), built as `cls(options, columns, cache_dir)` with the
`data.fetch` options; it has `path` (the file it fetches into), `labels` (the label set it was asked for, or None),
`prepare()` and `wait_until_prepared(timeout, poll)`. This module imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from lmtune.core.errors import DataError
from lmtune.data.records import RecordSpec, existing_file, reader_for

SOURCES = ("auto", "file", "hf")  # and every installed source plug-in (`plugin_sources`)
PLUGIN_GROUP = "lmtune.sources"


def plugin_sources() -> dict:
    """Installed source plug-ins by name (entry points of `lmtune.sources`)."""
    from importlib.metadata import entry_points

    return {point.name: point for point in entry_points(group=PLUGIN_GROUP)}


def resolve_source(source: str, path: str | None, hf_name: str | None, fetch: Mapping | None = None) -> str:
    """The concrete source for `auto`: a given file, else a given HF dataset, else the plug-in `fetch` names."""
    if source not in SOURCES and source not in plugin_sources():
        known = [*SOURCES, *plugin_sources()]
        raise DataError(f"data.source={source!r}: use one of {', '.join(known)}.")
    if source != "auto":
        return source
    if not (path or hf_name or (fetch and fetch.get("source"))):
        raise DataError(
            "no data: set `data.path=` (a JSONL, CSV or Parquet file, optionally .gz) or `data.hf_name=` "
            "(a Hugging Face dataset)."
        )
    return "file" if path else "hf" if hf_name else fetch["source"]


class RecordSource:
    """One configured source of records; `rows()` gives the raw rows, read as the task's records."""

    def __init__(
        self,
        spec: RecordSpec,
        source: str = "auto",
        path: str | None = None,
        fetch: Mapping | None = None,
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_revision: str | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.kind = resolve_source(source, path, hf_name, fetch)
        self.path = Path(path) if path else None
        self.spec = spec
        self.hf = {"name": hf_name, "config": hf_config, "split": hf_split, "revision": hf_revision}
        self.download = None  # a source plug-in: fetched before it is read
        if self.kind == "file" and self.path is None:
            raise DataError("data.source=file needs `data.path=` (a JSONL, CSV or Parquet file, optionally .gz).")
        if self.kind == "hf" and not hf_name:
            raise DataError("data.source=hf needs `data.hf_name=` (a hub dataset id or a local dataset folder).")
        if self.kind not in SOURCES:
            options = {k: v for k, v in (fetch or {}).items() if k != "source"}
            plugin = plugin_sources()[self.kind].load()
            self.download = plugin(options, spec.text, Path(cache_dir or ".cache"))
            self.path = self.download.path

    @property
    def where(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.hf['name']}[{self.hf['split']}]"
        return str(self.path)

    @property
    def natural_labels(self) -> list[str] | None:
        """The label set the source itself names (what a downloaded source was asked for), if it names one."""
        return self.download.labels if self.download else None

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
