"""Reading labelled text records from JSONL, CSV or Parquet (`.gz` too), choosing the label set and splitting
by id hash.

Which columns make a record is the task's choice (`RecordSpec`: the columns the prompt reads, the label column,
the id column), so one reader serves any labelled text (support tickets, reviews). Every skipped record is
counted by reason (`SkipCounts`), so a user can see what was dropped; input that cannot be trusted at all (a
malformed line, a missing column, bytes that are not UTF-8) raises `DataError` naming the file, the line and
the fix.
"""

from __future__ import annotations

import csv
import datetime
import gzip
import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmtune.core.errors import DataError
from lmtune.data.conversations import read_messages

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    id: str
    fields: dict[str, str]  # the columns the prompt reads, whitespace collapsed
    label: str
    date: str = ""  # ISO 8601 (UTC, no zone), where the spec names a date column and the row has a readable date
    labels: tuple[str, ...] = ()  # every label of the row (the spec's `all_labels` column), the label among them


@dataclass(frozen=True)
class RecordSpec:
    """Which columns of a row make a record.

    `text`: the columns the prompt reads (each must be non-empty); `label`: the label columns, the first
    non-empty one wins; `label_is_list`: a label cell lists several classes (a list, a JSON list, or words
    separated by spaces or commas) and the first is the label; `id`: the id column:
    when the file has none, the id is a hash of the row's text, so splits stay stable when the file grows;
    `rename`: the name used here -> the file's own column (e.g. {body: text}); `messages`: the one text column
    is a conversation in the OpenAI chat format (checked by `conversations.read_messages`, kept as JSON). A task
    without a label column (free-form answers) has `label=()`. `date`: a column of dates (for a split by time; a
    row without a readable one keeps an empty date, and the split decides); `all_labels`: a column listing every
    label of a row (arXiv's `categories`), for scoring an answer against all of them.
    """

    text: tuple[str, ...] = ("text",)
    label: tuple[str, ...] = ("label",)
    id: str = "id"
    label_is_list: bool = False
    rename: dict[str, str] = field(default_factory=dict)
    messages: bool = False
    date: str | None = None
    all_labels: str | None = None

    @classmethod
    def of(
        cls, text, label="label", id="id", label_is_list=False, rename=None, messages=False, date=None, all_labels=None
    ) -> RecordSpec:
        label = () if not label else (label,) if isinstance(label, str) else tuple(label)
        return cls(tuple(text), label, id, bool(label_is_list), dict(rename or {}), messages, date, all_labels)

    def extras(self) -> list:
        """What the optional columns add to a prepared-records cache key (nothing when unused, so caches written
        before they existed stay valid)."""
        return [["date", self.date]] * bool(self.date) + [["all_labels", self.all_labels]] * bool(self.all_labels)

    def label_of(self, row: Mapping) -> str:
        for column in self.label:
            value = row.get(column)
            if self.label_is_list:
                value = next(iter(_label_list(value)), "")
            elif isinstance(value, list | tuple):  # a list cell: its first class
                value = value[0] if value else ""
            if clean_text(value):
                return clean_text(value)
        return ""


def text_id(fields: Mapping[str, str]) -> str:
    """A stable id from a row's text, for files without an id column."""
    return hashlib.sha256("\x1f".join(fields.values()).encode()).hexdigest()[:16]


@dataclass
class SkipCounts:
    """Counts of records dropped, by reason; logged once so nothing disappears silently."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} records: {parts}"


def clean_text(value) -> str:
    """Collapse whitespace; None and non-strings become ''."""
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas-like sources
        return ""
    return " ".join(str(value).split())


def _label_list(value) -> list[str]:
    """Accept a list, a JSON list string, or a space/comma separated string (CSV exports)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value.strip("[]").replace("'", "").replace('"', "")
        if isinstance(value, str):
            return [c for c in value.replace(",", " ").split() if c]
    return [str(c).strip() for c in value if str(c).strip()]


def read_date(value) -> str:
    """An ISO 8601 date or date-time (a `Z` or an offset is converted to UTC) as `YYYY-MM-DDTHH:MM:SS`, which sorts
    in time order; '' for a missing or unreadable one."""
    if isinstance(value, datetime.datetime | datetime.date):
        moment = value if isinstance(value, datetime.datetime) else datetime.datetime.combine(value, datetime.time())
    elif not isinstance(value, str):  # a number could be seconds or days since anything: not a date
        return ""
    else:
        text = clean_text(value)
        if not text:
            return ""
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return ""
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return moment.replace(microsecond=0).isoformat()


def to_record(raw: Mapping, spec: RecordSpec, skips: SkipCounts) -> Record | None:
    """Validate one row (already renamed); return None (and count why) if it cannot be used."""
    if spec.messages:
        column = spec.text[0]
        messages, problem = read_messages(raw.get(column))
        if problem:
            skips.add(problem if raw.get(column) is not None else f"missing '{column}'")
            return None
        fields = {column: json.dumps(messages, ensure_ascii=False)}
    else:
        fields = {column: clean_text(raw.get(column)) for column in spec.text}
    for column, value in fields.items():
        if not value:
            skips.add(f"missing or empty '{column}'")
            return None
    label = spec.label_of(raw) if spec.label else ""
    if spec.label and not label:
        skips.add(f"missing {' and '.join(repr(c) for c in spec.label)}")
        return None
    if spec.id in raw:
        record_id = clean_text(raw[spec.id])
        if not record_id:
            skips.add(f"missing or empty '{spec.id}'")
            return None
    else:
        record_id = text_id(fields)
    date = read_date(raw.get(spec.date)) if spec.date else ""
    labels = tuple(dict.fromkeys([label, *_label_list(raw.get(spec.all_labels))])) if spec.all_labels else ()
    return Record(id=record_id, fields=fields, label=label, date=date, labels=labels)


def iter_jsonl(path: Path, spec: RecordSpec) -> Iterator[dict]:
    for _, obj in iter_jsonl_lines(path):
        yield obj


def _open(path: Path, mode: str):
    """The file, gunzipped on the fly (streamed) for `.gz`."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    if mode == "rb":
        return opener(path, "rb")
    # a byte-order mark (as Windows tools write it) is dropped; the csv module handles CRLF with newline=""
    return opener(path, "rt", encoding="utf-8-sig", newline="")


READ_ERRORS = (EOFError, zlib.error, OSError)  # a truncated or corrupt archive; gzip.BadGzipFile is an OSError


def _broken_archive(path: Path, error: Exception, where: str) -> DataError:
    return DataError(
        f"{where}: the file breaks off mid-read ({error}): a truncated or corrupt archive. Download or compress "
        f"{path.name} again (`gzip -t {path.name}` checks an archive)."
    )


def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a broken line is a DataError naming file:line.
    A UTF-8 byte-order mark and CRLF line ends are accepted."""
    lineno = 0
    with _open(path, "rb") as f:
        lines = iter(f)
        while True:
            try:
                raw_line = next(lines)
            except StopIteration:
                return
            except READ_ERRORS as e:
                raise _broken_archive(path, e, f"{path}: after line {lineno}") from None
            lineno += 1
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: bytes that are not UTF-8 at column {e.start + 1} "
                    f"({raw_line[e.start : e.start + 4]!r}). Re-encode the file as UTF-8 "
                    f"(for example `iconv -f latin1 -t utf-8`) or fix that line."
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}). "
                    f"Each line must be one JSON object; fix or delete that line."
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}.")
            yield lineno, obj


def rename_columns(row: Mapping, rename: Mapping[str, str] | None) -> Mapping:
    """The row under the names the task uses: `rename` maps such a name to the source's own column."""
    if not rename:
        return row
    renamed = dict(row)
    for ours, theirs in rename.items():
        if theirs in row:
            renamed[ours] = row[theirs]
    return renamed


def check_columns(where: str, names: Iterable[str], spec: RecordSpec) -> None:
    """Fail at once, naming the missing column, when a table lacks a column the task reads."""
    found = sorted(names)
    names = set(rename_columns(dict.fromkeys(names), spec.rename))
    missing = [c for c in spec.text if c not in names]
    if missing and spec.messages:
        raise DataError(
            f"{where}: no conversation column {missing[0]!r}; it has {found}. Name the column of OpenAI-style "
            f"messages with `data.messages_column=<column>`."
        )
    if missing:
        raise DataError(
            f"{where}: the prompt (data.prompt.user) reads column(s) {', '.join(map(repr, missing))}, which the "
            f"data lacks; it has {found}. Name those columns in data.prompt.user, or map one with "
            f"`data.columns={{{missing[0]}: <your column>}}`."
        )
    if spec.label and not names & set(spec.label):
        raise DataError(
            f"{where}: no label column {' or '.join(map(repr, spec.label))}; it has {found}. "
            f"Set data.label_column=<the column with the class>."
        )


def _iter_csv(path: Path, spec: RecordSpec) -> Iterator[dict]:
    with _open(path, "rt") as f:
        reader = csv.DictReader(f)
        try:
            check_columns(str(path), reader.fieldnames or [], spec)
            yield from reader
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: bytes that are not UTF-8 ({e.object[e.start : e.start + 4]!r}) near line "
                f"{reader.line_num + 1}. Re-encode the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)."
            ) from None
        except READ_ERRORS as e:
            raise _broken_archive(path, e, f"{path}: after line {reader.line_num}") from None


def _iter_parquet(path: Path, spec: RecordSpec) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from None
    check_columns(str(path), table.column_names, spec)
    yield from table.to_pylist()


READERS = {".jsonl": iter_jsonl, ".json": iter_jsonl, ".csv": _iter_csv, ".parquet": _iter_parquet}
GZIP_READABLE = (".jsonl", ".json", ".csv")  # read as a stream; Parquet compresses inside the file


def reader_for(path: Path):
    """The reader of a file by its type: `.jsonl`, `.csv`, `.parquet`, or `.jsonl.gz` / `.csv.gz`."""
    suffixes = [s.lower() for s in path.suffixes]
    kind = suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else suffixes[-1] if suffixes else ""
    gz = suffixes[-1:] == [".gz"]
    if kind in READERS and (not gz or kind in GZIP_READABLE):
        return READERS[kind]
    known = sorted(READERS) + [f"{k}.gz" for k in GZIP_READABLE]
    raise DataError(f"{path}: unknown file type '{''.join(path.suffixes[-2 if gz else -1 :])}'; use one of {known}.")


def existing_file(path: str | Path, spec: RecordSpec) -> Path:
    """`path` if it is a file, else a DataError naming it and what it should hold."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {path.resolve()}. Point `data.path=` at a JSONL, CSV or Parquet file "
            f"(optionally .gz) with the columns {', '.join(spec.text + spec.label[:1])}."
        )
    return path


def read_records(path: str | Path, skips: SkipCounts, spec: RecordSpec) -> list[Record]:
    """Read and validate all records of a file; duplicates and unusable rows are counted in `skips`."""
    path = existing_file(path, spec)
    return records_from_rows(reader_for(path)(path, spec), str(path), skips, spec)


def records_from_rows(rows: Iterable[Mapping], where: str, skips: SkipCounts, spec: RecordSpec) -> list[Record]:
    """Validated, de-duplicated records from raw rows of any source; `where` names the source in errors."""
    return list(iter_records(rows, where, skips, spec))


def iter_records(rows: Iterable[Mapping], where: str, skips: SkipCounts, spec: RecordSpec) -> Iterator[Record]:
    """`records_from_rows` as a stream: memory stays flat however many rows there are (only ids are kept, to
    drop duplicates); the checks that need every row (no rows, a column no row has) run at the end."""
    seen, columns, hashed, kept = set(), set(), 0, 0
    for raw in rows:
        columns.update(raw)
        raw = rename_columns(raw, spec.rename)
        record = to_record(raw, spec, skips)
        if record is None:
            continue
        hashed += spec.id not in raw
        if record.id in seen:
            skips.add("duplicate id" if spec.id in raw else "duplicate text (no id column)")
            continue
        seen.add(record.id)
        kept += 1
        yield record
    if not columns:
        raise DataError(
            f"{where}: the data has no rows; give a file with a header and rows (CSV) or one object per line."
        )
    check_columns(where, columns, spec)  # a column no row has (JSONL has no header to check first)
    if hashed:
        log.info("%s: %d rows without an '%s' column get an id from a hash of their text", where, hashed, spec.id)
    if not kept:
        raise DataError(f"{where}: no usable records ({skips.summary()}).")


def choose_labels(counts: Mapping[str, int], top_k: int | None, labels: list[str] | None) -> list[str]:
    """The label set: an explicit list, else the top-k most frequent labels (ties broken by name), sorted.
    `counts`: how many records have each label."""
    if labels:
        return sorted(dict.fromkeys(labels))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top_k:
        ranked = ranked[:top_k]
    return sorted(label for label, _ in ranked)


def hash_unit(record_id: str, salt: str = "") -> float:
    """A stable number in [0, 1) from the id: the same row always lands in the same split."""
    digest = hashlib.sha256(f"{salt}{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(record_id: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    u = hash_unit(record_id, salt)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


@dataclass(frozen=True)
class SplitPlan:
    """How records are split (`data.split`): `random` by a hash of the id (a row never changes split when the file
    grows), or `time`: the oldest rows train, the newer validate and the newest test, by `date_column`; a row
    without a readable date is refused (`missing_dates: error`, one line with the count and the fix) or left out
    and counted (`skip`)."""

    val_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = ""
    kind: str = "random"
    date_column: str | None = None
    missing_dates: str = "error"

    def problems(self) -> list[str]:
        problems = []
        if self.kind not in ("random", "time"):
            problems.append(f"data.split={self.kind!r}: use random (by a hash of the id) or time (oldest rows train)")
        if self.kind == "time" and not self.date_column:
            problems.append("data.split=time needs data.date_column: the column of dates to order the rows by")
        if self.missing_dates not in ("error", "skip"):
            problems.append(f"data.missing_dates={self.missing_dates!r}: use error or skip")
        return problems


def split_indices(
    ids: Sequence[str],
    labels: Sequence[str] | None,
    label_set: list[str] | None,
    plan: SplitPlan,
    skips: SkipCounts,
    dates: Sequence[str] | None = None,
    where: str = "the data",
) -> dict[str, list[int]]:
    """Positions of the records (given by id and label) whose label is in the label set (every record when there
    is no label set), split by plan, each split in hash order (a fixed shuffle: a `limit` takes a representative,
    reproducible slice of its split, and of its period under a split by time)."""
    allowed = set(label_set) if label_set is not None else None
    kept = []
    for i, label in enumerate(labels if labels is not None else ids):
        if allowed is not None and label not in allowed:
            skips.add("label outside the label set")
            continue
        kept.append(i)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    if plan.kind == "time":
        splits = _split_by_time(kept, ids, dates, plan, skips, where)
    else:
        for i in kept:
            splits[split_of(ids[i], plan.val_fraction, plan.test_fraction, plan.salt)].append(i)
    for name in SPLITS:
        splits[name].sort(key=lambda i: hash_unit(ids[i], plan.salt + name))
    return splits


def _split_by_time(kept, ids, dates, plan: SplitPlan, skips: SkipCounts, where: str) -> dict[str, list[int]]:
    undated = [i for i in kept if not dates[i]]
    if undated and plan.missing_dates == "error":
        raise DataError(
            f"{where}: {len(undated)} of {len(kept)} rows have no readable date in '{plan.date_column}' "
            f"(data.date_column) for data.split=time; fill them (ISO dates, e.g. 2026-07-01), or leave them out "
            f"with data.missing_dates=skip (counted)."
        )
    if undated:
        skips.add(f"no readable date in '{plan.date_column}' (data.split=time)", len(undated))
    ordered = sorted((i for i in kept if dates[i]), key=lambda i: (dates[i], hash_unit(ids[i], plan.salt)))
    n_test = round(len(ordered) * plan.test_fraction)
    n_val = round(len(ordered) * plan.val_fraction)
    n_train = len(ordered) - n_val - n_test
    return {
        "train": ordered[:n_train],
        "val": ordered[n_train : n_train + n_val],
        "test": ordered[n_train + n_val :],
    }


def date_ranges(splits: Mapping[str, Sequence[Record]]) -> dict[str, list[str]]:
    """Each split's first and last date (YYYY-MM-DD), for the report and the data manifest."""
    ranges = {}
    for name, records in splits.items():
        dated = [r.date[:10] for r in records if r.date]
        if dated:
            ranges[name] = [min(dated), max(dated)]
    return ranges
