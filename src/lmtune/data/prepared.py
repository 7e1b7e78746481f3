"""Prepared data on disk: validated records and tokenized examples as memory-mapped Arrow tables (Hugging Face
`datasets`), cached by fingerprint, so memory stays flat as the data grows and a second run, every sweep job and
every rank reuse the work instead of redoing it.

Two stages, each cached under `<cache_dir>/data/`:

- **records** (`prepare_records`): a source's rows validated as `records.py` does (the same skips, counted,
  and the same errors), streamed into a table of id, label and the prompt's columns, with a manifest of the skip
  and label counts. Keyed by the source (a file's path, inode, size, mtime and ctime; a HF dataset's fingerprint),
  the columns read and `CACHE_VERSION`.
- **examples** (`format_examples`): one split's records formatted by `ChatFormatter`, a batched `Dataset.map`
  over the available cores. Keyed by the records, the rows chosen (split, order, limit) and everything the
  formatter's output depends on (`ChatFormatter.fingerprint`: tokenizer, template, prompts, labels, max_length).

A changed file, prompt, label set, tokenizer or setting gives another key: a miss, never stale data. Entries are
written under a temporary name and renamed into place, behind a file lock, so parallel jobs wait for one writer.
Old entries are not evicted: `rm -rf <cache_dir>/data` clears them.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from lmtune.core.digest import json_digest
from lmtune.core.errors import DataError
from lmtune.core.files import atomic_write
from lmtune.data.formatting import IGNORE_INDEX, ChatFormatter, Example
from lmtune.data.records import Record, RecordSpec, SkipCounts, iter_records

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the readers or the formatter change what they produce for the same input
WRITE_BATCH = 10_000  # records per Arrow record batch while streaming
PROGRESS_EVERY = 100_000  # rows between progress lines while reading
ROWS_PER_PROCESS = 4_000  # tokenizing fewer rows than this per process is not worth starting one


_SCRATCH: Path | None = None  # where prepared data goes when no cache folder is configured (removed at exit)


def cache_root(cache_dir: str | Path | None) -> Path:
    """`<cache_dir>/data`, or a folder removed at exit when no cache folder is configured."""
    if cache_dir is None:
        global _SCRATCH
        if _SCRATCH is None:
            _SCRATCH = Path(tempfile.mkdtemp(prefix="lmtune-data-"))
            atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
        return _SCRATCH
    return Path(cache_dir) / "data"


@contextmanager
def _writing(root: Path, name: str):
    """Exclusive access to one cache entry (other processes wait), and a clear error if the folder is unusable."""
    from filelock import FileLock

    try:
        (root / "locks").mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / "locks" / f"{name}.lock")):
            yield
    except OSError as e:
        if e.filename and not Path(e.filename).is_relative_to(root):
            raise  # another file (the data itself): not the cache's to explain
        raise DataError(
            f"cannot write prepared data under {root} ({e.strerror or e}). Free space there, or point "
            f"`paths.cache_dir=` (or LMTUNE_CACHE) at a writable folder with room."
        ) from None


# --- records ---------------------------------------------------------------------------------------------
class RecordTable(Sequence[Record]):
    """Records backed by an Arrow table (id, label, the prompt's columns): indexing builds a `Record`.
    `key` names the prepared records it was read from; `rows`, the positions it holds there (None: all)."""

    def __init__(self, table, columns: Sequence[str], key: str, rows: list[int] | None = None):
        self.table, self.columns, self.key, self.rows = table, tuple(columns), key, rows

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        return self._record(self.table[index])

    def __iter__(self) -> Iterator[Record]:
        for batch in self.table.iter(batch_size=1000):
            yield from map(self._record, _rows(batch))

    def _record(self, row: Mapping) -> Record:
        fields = {c: row[c] for c in self.columns}
        return Record(row["id"], fields, row["label"], row.get("date") or "", tuple(row.get("labels") or ()))

    def column(self, name: str) -> list:
        return column(self.table, name)

    def select(self, positions: Sequence[int]) -> RecordTable:
        """The records at these positions of this table, in this order."""
        rows = list(positions) if self.rows is None else [self.rows[i] for i in positions]
        return RecordTable(self.table.select(positions), self.columns, self.key, rows)


def _rows(batch: Mapping[str, list]) -> Iterator[dict]:
    """The rows of a batch of columns (what `Dataset.iter` and indexing by a list give)."""
    return (dict(zip(batch, row, strict=True)) for row in zip(*batch.values(), strict=True))


def column(table, name: str) -> list:
    """A column of a `datasets.Dataset` as a list, in one read (an empty split mapped has no columns)."""
    if not len(table):
        return []
    return table.with_format("arrow")[name].to_pylist()


def prepare_records(
    rows: Iterable[Mapping], where: str, key: dict, spec: RecordSpec, cache_dir: str | Path | None
) -> tuple[RecordTable, SkipCounts, Counter]:
    """The source's validated records as a memory-mapped table, with the skips and the label counts; read from
    the cache when this source and these columns were prepared before."""
    from datasets import Dataset

    root = cache_root(cache_dir)
    name = "records-" + json_digest(
        [CACHE_VERSION, key, spec.text, spec.label, spec.id, spec.label_is_list, spec.rename]
        + (["messages"] if spec.messages else [])
        + spec.extras()
    )
    arrow, manifest = root / f"{name}.arrow", root / f"{name}.json"
    with _writing(root, name):
        if not (arrow.is_file() and manifest.is_file()):
            _write_records(rows, where, spec, arrow, manifest)
        else:
            log.info("%s: records from the cache %s", where, arrow)
        info = json.loads(manifest.read_text())
    table = Dataset.from_file(str(arrow))
    return RecordTable(table, spec.text, name), SkipCounts(Counter(info["skipped"])), Counter(info["labels"])


def _write_records(rows: Iterable[Mapping], where: str, spec: RecordSpec, arrow: Path, manifest: Path) -> None:
    """Stream validated records into `arrow` in batches, then the manifest (written last: it marks the entry whole)."""
    schema = pa.schema([("id", pa.string()), ("label", pa.string())] + [(c, pa.string()) for c in spec.text])
    if spec.date:
        schema = schema.append(pa.field("date", pa.string()))
    if spec.all_labels:
        schema = schema.append(pa.field("labels", pa.list_(pa.string())))
    skips, labels, batch, read, started = SkipCounts(), Counter(), [], 0, time.monotonic()
    tmp = arrow.with_name(f"{arrow.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for record in iter_records(_counted(rows, where, started), where, skips, spec):
                batch.append(record)
                labels[record.label] += 1
                if len(batch) == WRITE_BATCH:
                    writer.write_batch(_record_batch(batch, spec, schema))
                    read += len(batch)
                    batch = []
            if batch:
                writer.write_batch(_record_batch(batch, spec, schema))
        os.replace(tmp, arrow)
        counts = {"where": where, "records": read + len(batch), "skipped": skips.counts, "labels": labels}
        atomic_write(manifest, lambda f: json.dump(counts, f))
    finally:
        tmp.unlink(missing_ok=True)


def _counted(rows: Iterable[Mapping], where: str, started: float) -> Iterator[Mapping]:
    """The rows, with a progress line every `PROGRESS_EVERY` rows (a large file takes minutes)."""
    for n, row in enumerate(rows, 1):
        if n % PROGRESS_EVERY == 0:
            elapsed = time.monotonic() - started
            log.info("%s: read %d rows in %.0f s (%.0f rows/s)", where, n, elapsed, n / elapsed)
        yield row


def _record_batch(records: list[Record], spec: RecordSpec, schema: pa.Schema) -> pa.RecordBatch:
    columns = [[r.id for r in records], [r.label for r in records]]
    columns += [[r.fields[c] for r in records] for c in spec.text]
    if spec.date:
        columns.append([r.date for r in records])
    if spec.all_labels:
        columns.append([list(r.labels) for r in records])
    arrays = [pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --- examples --------------------------------------------------------------------------------------------
class ExampleTable(Sequence[Example]):
    """Tokenized examples backed by an Arrow table; indexing builds an `Example` (labels: the prompt masked)."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ExampleTable(self.table.select(range(len(self))[index]))
        return _example(self.table[index])

    def __getitems__(self, indices: list[int]) -> list[Example]:
        """One read for a whole batch (torch's DataLoader calls this when it exists)."""
        return list(map(_example, _rows(self.table[indices])))

    def __iter__(self) -> Iterator[Example]:
        for batch in self.table.iter(batch_size=256):
            yield from map(_example, _rows(batch))

    @property
    def lengths(self) -> list[int]:
        return column(self.table, "length")

    @property
    def truncated(self) -> int:
        return sum(column(self.table, "truncated"))


def _example(row: Mapping) -> Example:
    ids, n = row["input_ids"], row["prompt_length"]
    if "spans" in row:  # a conversation: its supervised spans, flat [start, end, start, end, ...]
        labels, spans = [IGNORE_INDEX] * len(ids), row["spans"]
        for start, end in zip(spans[::2], spans[1::2], strict=True):
            labels[start:end] = ids[start:end]
    else:
        labels = [IGNORE_INDEX] * n + ids[n:]
    return Example(
        id=row["id"],
        input_ids=ids,
        labels=labels,
        prompt_length=n,
        label_index=row["label_index"],
        truncated=row["truncated"],
    )


class _FormatBatch:
    """The `Dataset.map` function: a batch of record columns -> example columns (picklable for worker processes)."""

    def __init__(self, formatter: ChatFormatter, columns: Sequence[str]):
        self.formatter, self.columns = formatter, tuple(columns)

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        records = [
            Record(id=i, fields={c: batch[c][k] for c in self.columns}, label=label)
            for k, (i, label) in enumerate(zip(batch["id"], batch["label"], strict=True))
        ]
        examples = self.formatter.format(records)
        return {
            "id": [e.id for e in examples],
            "input_ids": [e.input_ids for e in examples],
            "prompt_length": [e.prompt_length for e in examples],
            "label_index": [e.label_index for e in examples],
            "truncated": [e.truncated for e in examples],
            "length": [len(e.input_ids) for e in examples],
        }


class _FormatConversations(_FormatBatch):
    """The `Dataset.map` function of conversations: a record may give several examples (`ConversationFormatter`),
    or none (a row for its skip reason, `length` 0, removed after the map)."""

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        out = {k: [] for k in ("id", "input_ids", "spans", "prompt_length", "label_index", "truncated", "length")}
        out["skip"] = []
        for k, record_id in enumerate(batch["id"]):
            record = Record(id=record_id, fields={c: batch[c][k] for c in self.columns}, label="")
            sequences, dropped, problem = self.formatter.fit(self.formatter.task.messages(record.fields))
            rows = [(record_id, [], [], problem)] if problem else []
            rows += [
                (record_id if n == 0 else f"{record_id}#{n}", ids, [i for span in spans for i in span], "")
                for n, (ids, spans) in enumerate(sequences)
            ]
            for i, (example_id, ids, spans, reason) in enumerate(rows):
                out["id"].append(example_id)
                out["input_ids"].append(ids)
                out["spans"].append(spans)
                out["prompt_length"].append(spans[0] if spans else 0)
                out["label_index"].append(-1)
                out["truncated"].append(bool(dropped) and i == 0)
                out["length"].append(len(ids))
                out["skip"].append(reason)
        return out


def format_conversations(
    records: RecordTable, formatter, cache_dir: str | Path | None, name: str, num_proc: int | None
) -> tuple[ExampleTable, dict[str, int]]:
    """`format_examples` for conversations: (the examples, the records skipped by reason)."""
    from datasets import List, Value

    extra = {"spans": List(Value("int32")), "skip": Value("string")}
    table = _map_examples(
        records, _FormatConversations(formatter, records.columns), formatter, cache_dir, name, num_proc, extra
    )
    lengths, reasons = column(table, "length"), column(table, "skip")
    skipped = Counter(r for r in reasons if r)
    return ExampleTable(table.select([i for i, n in enumerate(lengths) if n])), dict(skipped)


def format_examples(
    records: RecordTable, formatter: ChatFormatter, cache_dir: str | Path | None, name: str, num_proc: int | None
) -> ExampleTable:
    """`records` (one split, in order) tokenized by `formatter`, from the cache when done before.
    `num_proc`: processes (None: the available cores, one per `ROWS_PER_PROCESS` rows)."""
    return ExampleTable(
        _map_examples(records, _FormatBatch(formatter, records.columns), formatter, cache_dir, name, num_proc)
    )


def _map_examples(records: RecordTable, function, formatter, cache_dir, name: str, num_proc: int | None, extra=None):
    """The batched, cached `Dataset.map` of `function` over the records of one split."""
    from datasets import Features, List, Value, disable_progress_bars, enable_progress_bars
    from datasets.utils.logging import is_progress_bar_enabled

    root = cache_root(cache_dir)
    rows = json_digest(records.rows) if records.rows is not None else "all"
    fingerprint = "examples-" + json_digest([CACHE_VERSION, records.key, rows, formatter.fingerprint()])
    if num_proc is None:
        num_proc = max(1, min(len(os.sched_getaffinity(0)), len(records) // ROWS_PER_PROCESS))
    num_proc = max(1, min(num_proc, len(records)))
    features = Features(
        {
            "id": Value("string"),
            "input_ids": List(Value("int32")),
            "prompt_length": Value("int32"),
            "label_index": Value("int32"),
            "truncated": Value("bool"),
            "length": Value("int32"),
            **(extra or {}),
        }
    )
    show_progress = is_progress_bar_enabled()
    if len(records) < 20_000:  # a bar only where tokenizing takes a while
        disable_progress_bars()
    try:
        with _writing(root, fingerprint), _tokenizers_single_threaded(num_proc > 1):
            table = records.table.map(
                function,
                batched=True,
                batch_size=1000,
                remove_columns=records.table.column_names,
                features=features,
                num_proc=num_proc if num_proc > 1 else None,
                new_fingerprint=fingerprint,
                cache_file_name=str(root / f"{fingerprint}.arrow"),
                load_from_cache_file=True,
                desc=f"tokenizing {name}",
            )
    finally:
        if show_progress:
            enable_progress_bars()
    return table


@contextmanager
def _tokenizers_single_threaded(forking: bool):
    """Worker processes each tokenize on one thread: a tokenizer forked after using its thread pool would warn
    and fall back anyway, and two levels of parallelism only contend for the same cores."""
    if not forking:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
