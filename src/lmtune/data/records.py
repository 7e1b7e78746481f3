"""Reading arXiv records from JSONL, CSV or Parquet, choosing the label set and splitting by id hash.

Every record that is skipped is counted by reason (`SkipCounts`), so a user can see what was dropped;
input that cannot be trusted at all (a malformed line, a missing column, bytes that are not UTF-8)
raises `DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lmtune.errors import UserError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "title", "abstract")
SPLITS = ("train", "val", "test")


class DataError(UserError):
    """Input data that cannot be used; the message names the file, line or field and the fix."""


@dataclass(frozen=True)
class Record:
    id: str
    title: str
    abstract: str
    label: str  # the primary category


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


def _text(value) -> str:
    """Collapse whitespace; None and non-strings become ''."""
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas-like sources
        return ""
    return " ".join(str(value).split())


def _categories(value) -> list[str]:
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


def to_record(raw: dict, skips: SkipCounts) -> Record | None:
    """Validate one raw row; return None (and count why) if it cannot be used."""
    values = {k: _text(raw.get(k)) for k in REQUIRED_FIELDS}
    for name in REQUIRED_FIELDS:
        if not values[name]:
            skips.add(f"missing or empty '{name}'")
            return None
    label = _text(raw.get("primary_category")) or next(iter(_categories(raw.get("categories"))), "")
    if not label:
        skips.add("missing 'primary_category' and 'categories'")
        return None
    return Record(id=values["id"], title=values["title"], abstract=values["abstract"], label=label)


def iter_jsonl(path: Path, columns: Mapping[str, str] | None = None) -> Iterator[dict]:
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


def rename_columns(row: dict, columns: Mapping[str, str] | None) -> dict:
    """Our field names from the source's: `columns` maps our field (id, title, ...) to the source column."""
    if not columns:
        return row
    renamed = dict(row)
    for ours, theirs in columns.items():
        if theirs in row:
            renamed[ours] = row[theirs]
    return renamed


def check_columns(where: str, names: Iterable[str], columns: Mapping[str, str] | None = None) -> None:
    """Fail at once, naming the missing fields, when a table lacks the columns a record needs."""
    names = set(rename_columns(dict.fromkeys(names), columns))
    missing = [c for c in REQUIRED_FIELDS if c not in names]
    if "primary_category" not in names and "categories" not in names:
        missing.append("primary_category (or categories)")
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; found {sorted(names)}. Records need id, title, "
            f"abstract and primary_category (or categories); map other names with "
            f"`data.columns={{abstract: summary, ...}}` (our field: your column)."
        )


def _iter_csv(path: Path, columns: Mapping[str, str] | None) -> Iterator[dict]:
    with _open(path, "rt") as f:
        reader = csv.DictReader(f)
        try:
            check_columns(str(path), reader.fieldnames or [], columns)
            yield from reader
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: bytes that are not UTF-8 ({e.object[e.start : e.start + 4]!r}) near line "
                f"{reader.line_num + 1}. Re-encode the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)."
            ) from None
        except READ_ERRORS as e:
            raise _broken_archive(path, e, f"{path}: after line {reader.line_num}") from None


def _iter_parquet(path: Path, columns: Mapping[str, str] | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from None
    check_columns(str(path), table.column_names, columns)
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


def read_records(path: str | Path, skips: SkipCounts, columns: Mapping[str, str] | None = None) -> list[Record]:
    """Read and validate all records of a file; duplicates and unusable rows are counted in `skips`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {path.resolve()}. Point `data.path=` at a JSONL, CSV or Parquet file "
            f"of arXiv records (id, title, abstract, primary_category)."
        )
    return records_from_rows(reader_for(path)(path, columns), str(path), skips, columns)


def records_from_rows(
    rows: Iterable[dict], where: str, skips: SkipCounts, columns: Mapping[str, str] | None = None
) -> list[Record]:
    """Validated, de-duplicated records from raw rows of any source; `where` names the source in errors."""
    records, seen = [], set()
    for raw in rows:
        record = to_record(rename_columns(raw, columns), skips)
        if record is None:
            continue
        if record.id in seen:
            skips.add("duplicate id")
            continue
        seen.add(record.id)
        records.append(record)
    if not records:
        raise DataError(f"{where}: no usable records ({skips.summary()}).")
    return records


def choose_labels(records: list[Record], top_k: int | None, labels: list[str] | None) -> list[str]:
    """The label set: an explicit list, else the top-k most frequent labels (ties broken by name), sorted."""
    if labels:
        return sorted(dict.fromkeys(labels))
    counts = Counter(r.label for r in records)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top_k:
        ranked = ranked[:top_k]
    return sorted(label for label, _ in ranked)


def hash_unit(record_id: str, salt: str = "") -> float:
    """A stable number in [0, 1) from the id: the same paper always lands in the same split."""
    digest = hashlib.sha256(f"{salt}{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(record_id: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    u = hash_unit(record_id, salt)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def split_records(
    records: list[Record], labels: list[str], val_fraction: float, test_fraction: float, salt: str, skips: SkipCounts
) -> dict[str, list[Record]]:
    """Keep records whose label is in the label set and split them by id hash, each split in hash order."""
    allowed = set(labels)
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for r in records:
        if r.label not in allowed:
            skips.add("label outside the label set")
            continue
        splits[split_of(r.id, val_fraction, test_fraction, salt)].append(r)
    for name in SPLITS:
        # hash order is a fixed shuffle: a `limit` takes a representative, reproducible slice
        splits[name].sort(key=lambda r: hash_unit(r.id, salt + name))
    return splits
