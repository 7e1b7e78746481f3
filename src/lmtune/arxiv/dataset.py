"""A training set from arXiv: one resumable fetch per category, merged without cross-listed duplicates."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.fetch import FetchPaths, FetchResult, fetch_records, write_manifest
from lmtune.arxiv.query import date_range, search_query
from lmtune.core.files import atomic_write

log = logging.getLogger(__name__)


def _finished_part(path: Path, query: str, max_results: int) -> FetchResult | None:
    """A category fetched completely by an earlier, interrupted `fetch_dataset` run: not fetched again."""
    manifest_path = FetchPaths.for_output(path).manifest
    if not (path.is_file() and manifest_path.is_file()):
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("query") != query or manifest.get("max_results") != max_results:
        return None
    log.info("reusing %s (%d records) from an earlier run", path, manifest["count"])
    return FetchResult(path, manifest["count"], manifest["duplicates_dropped"], 0, skipped=manifest["skipped_unusable"])


def fetch_dataset(
    client: ArxivClient,
    categories: Iterable[str],
    max_results: int,
    out_path: str | Path,
    per_category: bool = True,
    page_size: int = 100,
    date_from: dt.date | str | None = None,
    date_to: dt.date | str | None = None,
) -> FetchResult:
    """A training set: up to `max_results` newest papers per category (or in all, with `per_category=False`).

    Per category is the default because one query over several categories returns mostly the busiest ones
    (cs.LG, cs.CV) and starves the small ones. Each category is its own resumable `fetch_records` run into
    `<out>.parts/` (a rerun after an interruption skips the categories already complete and resumes the
    one that was cut off); the parts are then merged into `out_path` (atomically, with a manifest), dropping papers
    that several category queries returned (cross-lists) and counting them.
    """
    categories = [categories] if isinstance(categories, str) else list(dict.fromkeys(categories))
    if not per_category:
        return fetch_records(client, categories, max_results, out_path, page_size, date_from, date_to)
    paths = FetchPaths.for_output(out_path)
    parts_dir = paths.out.with_name(f"{paths.out.stem}.parts")
    parts = {
        cat: _finished_part(parts_dir / f"{cat}.jsonl", search_query([cat], date_from, date_to), max_results)
        or fetch_records(client, [cat], max_results, parts_dir / f"{cat}.jsonl", page_size, date_from, date_to)
        for cat in categories
    }
    seen: set[str] = set()
    cross_listed = 0
    digest = hashlib.sha256()

    def merge(f) -> None:
        nonlocal cross_listed
        for part in parts.values():
            with part.path.open("rb") as src:
                for line in src:
                    record_id = json.loads(line)["id"]
                    if record_id in seen:
                        cross_listed += 1
                        continue
                    seen.add(record_id)
                    digest.update(line)
                    f.write(line)

    atomic_write(paths.out, merge, mode="wb")
    result = FetchResult(
        path=paths.out,
        count=len(seen),
        duplicates_dropped=cross_listed + sum(part.duplicates_dropped for part in parts.values()),
        pages=sum(part.pages for part in parts.values()),
        skipped=sum(part.skipped for part in parts.values()),
    )
    write_manifest(
        paths,
        client,
        {cat: search_query([cat], date_from, date_to) for cat in categories},
        categories,
        date_range(date_from, date_to),
        max_results,
        page_size,
        result.count,
        result.duplicates_dropped,
        result.skipped,
        digest,
        per_category=True,
        count_per_category={cat: part.count for cat, part in parts.items()},
    )
    shutil.rmtree(parts_dir, ignore_errors=True)
    log.info(
        "wrote %d records to %s (%d cross-listed papers appeared under several categories)",
        result.count,
        paths.out,
        cross_listed,
    )
    return result
