"""Collecting one query's records into a JSONL file.

Tens of thousands of records take hours at 3 s/request, so `fetch_records` saves its progress after every
complete page and a rerun of the same query continues where it stopped. The output is written atomically and
described by a manifest (query, counts, sha256), so a half-written file is never mistaken for a finished one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.query import date_range, search_query
from lmtune.core.files import atomic_write
from lmtune.core.progress import Progress

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 2000  # the API refuses larger `max_results` per request


@dataclass(frozen=True)
class FetchPaths:
    """The output file and the files kept beside it: progress (partial + state) and the manifest."""

    out: Path
    partial: Path
    state: Path
    manifest: Path

    @classmethod
    def for_output(cls, out_path: str | Path) -> FetchPaths:
        out = Path(out_path)
        return cls(
            out=out,
            partial=out.with_name(f"{out.stem}.partial.jsonl"),
            state=out.with_name(f"{out.stem}.state.json"),
            manifest=out.with_name(f"{out.stem}.manifest.json"),
        )


@dataclass
class FetchResult:
    path: Path
    count: int
    duplicates_dropped: int
    pages: int  # pages requested by this call (a resumed run does not re-request earlier pages)
    resumed_from: int = 0  # the `start` this call continued from; 0 for a fresh run
    skipped: int = 0  # unusable entries dropped by `parse_feed`


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def _load_progress(paths: FetchPaths, query_key: dict, max_results: int) -> dict | None:
    """The saved progress for the same query, with the partial file trimmed to the last complete page.

    A crash between appending a page and saving the state leaves extra lines in the partial file; those
    are cut off here (that page is fetched again). Anything inconsistent means starting over.
    """
    if not paths.state.is_file() or not paths.partial.is_file():
        return None
    try:
        state = json.loads(paths.state.read_text(encoding="utf-8"))
        saved = int(state["count"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable progress file %s (%s); starting over", paths.state, exc)
        return None
    if state.get("query") != query_key:
        log.info("progress file %s is for a different query; starting over", paths.state)
        return None

    keep = min(saved, max_results)  # a rerun asking for fewer records than already saved
    ids, size = [], 0
    with paths.partial.open("rb") as f:
        for line in f:
            if len(ids) == keep or not line.endswith(b"\n"):
                break
            try:
                ids.append(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                break
            size += len(line)
    if len(ids) != keep:
        log.warning(
            "progress file %s has %d usable records, expected %d; starting over", paths.partial, len(ids), saved
        )
        return None
    with paths.partial.open("r+b") as f:
        f.truncate(size)
    state["ids"] = ids
    return state


def fetch_records(
    client: ArxivClient,
    categories: Iterable[str],
    max_results: int,
    out_path: str | Path,
    page_size: int = 100,
    date_from: dt.date | str | None = None,
    date_to: dt.date | str | None = None,
) -> FetchResult:
    """Collect up to `max_results` records (newest submissions first) into a JSONL file at `out_path`.

    Pages through the API until `max_results` unique records or the end of the results. After each
    complete page the records so far and the next `start` are saved beside the output, so a rerun of
    the same query continues from there; the final file is written atomically with a manifest.
    """
    if max_results < 0:
        raise ValueError(f"max_results must be >= 0, got {max_results}")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE} (the API's limit), got {page_size}")
    categories = [categories] if isinstance(categories, str) else list(categories)
    query = search_query(categories, date_from, date_to)
    dates = date_range(date_from, date_to)
    paths = FetchPaths.for_output(out_path)
    paths.out.parent.mkdir(parents=True, exist_ok=True)
    query_key = {"search_query": query, "sortBy": "submittedDate", "sortOrder": "descending"}

    progress = _load_progress(paths, query_key, max_results)
    if progress is None:
        paths.state.unlink(missing_ok=True)
        paths.partial.write_bytes(b"")
        progress = {"next_start": 0, "count": 0, "duplicates_dropped": 0, "skipped": 0, "ids": []}
    else:
        log.info("resuming %s at start=%d with %d records", paths.out, progress["next_start"], progress["count"])
    start = resumed_from = int(progress["next_start"])
    seen = set(progress["ids"])
    count, duplicates, skipped = len(seen), int(progress["duplicates_dropped"]), int(progress["skipped"])
    total: int | None = progress.get("total_results")
    pages = 0
    log.info("fetching up to %d records for %s (page size %d)", max_results, query, page_size)
    # a bar on a terminal; otherwise a line per page (records so far, records/s, time left)
    wanted = max(max_results - count, 0)
    bar = Progress(
        wanted, "fetching from arXiv", unit="records", steps=max(1, math.ceil(wanted / page_size)), min_interval=0
    )
    with bar:
        while count < max_results and (total is None or start < total):
            page_start = start
            page = client.get({**query_key, "start": start, "max_results": page_size})
            pages += 1
            total = page.total_results
            skipped += page.skipped
            if not page.entries and page.skipped == 0:
                if start < total:
                    log.warning("empty page at start=%d although the API reports %d results; stopping", start, total)
                break
            new, page_duplicates, consumed = [], 0, 0
            for record in page.entries:
                if count + len(new) >= max_results:
                    break
                consumed += 1
                if record.id in seen:
                    page_duplicates += 1
                    continue
                seen.add(record.id)
                new.append(record)
            with paths.partial.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in new)
                f.flush()
                os.fsync(f.fileno())
            count += len(new)
            duplicates += page_duplicates
            # Advance past what was used, not past the whole page: a rerun asking for more continues exactly here.
            start += consumed + page.skipped
            _write_json(
                paths.state,
                {
                    "query": query_key,
                    "next_start": start,
                    "count": count,
                    "duplicates_dropped": duplicates,
                    "skipped": skipped,
                    "total_results": total,
                },
            )
            bar.advance(len(new))
            log.debug(
                "page %d (start=%d): %d entries, %d new, %d duplicate; %d/%d records, %d results in total",
                pages,
                page_start,
                len(page.entries),
                len(new),
                page_duplicates,
                count,
                max_results,
                total,
            )

    digest = hashlib.sha256()

    def copy_partial(f) -> None:
        with paths.partial.open("rb") as src:
            for line in src:
                digest.update(line)
                f.write(line)

    atomic_write(paths.out, copy_partial, mode="wb")
    write_manifest(paths, client, query, categories, dates, max_results, page_size, count, duplicates, skipped, digest)
    paths.partial.unlink(missing_ok=True)
    paths.state.unlink(missing_ok=True)
    log.info("wrote %d records to %s (%d duplicates dropped, %d pages this run)", count, paths.out, duplicates, pages)
    return FetchResult(
        path=paths.out,
        count=count,
        duplicates_dropped=duplicates,
        pages=pages,
        resumed_from=resumed_from,
        skipped=skipped,
    )


def write_manifest(
    paths: FetchPaths,
    client: ArxivClient,
    query,
    categories: list[str],
    dates: tuple[dt.date, dt.date] | None,
    max_results: int,
    page_size: int,
    count: int,
    duplicates: int,
    skipped: int,
    digest,
    **extra,
) -> None:
    """What was asked, of which server, when, and what came back (with the output file's sha256)."""
    manifest = {
        "query": query,
        "categories": categories,
        "date_from": dates[0].isoformat() if dates else None,
        "date_to": dates[1].isoformat() if dates else None,
        "max_results": max_results,
        "page_size": page_size,
        "base_url": client.base_url,
        "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "count": count,
        "duplicates_dropped": duplicates,
        "skipped_unusable": skipped,
        "sha256": digest.hexdigest(),
        **extra,
    }
    _write_json(paths.manifest, manifest)
