"""A small, polite client for the public arXiv API (Atom feed) that collects training records.

Why it looks the way it does:

* arXiv asks API users to make at most one request every 3 seconds, so `ArxivClient` spaces *every*
  HTTP request (retries included) by `min_interval`, and sends a descriptive User-Agent.
* The API is flaky in practice: timeouts, 5xx/429 answers and bodies cut off mid-document all happen.
  These are retried with exponential backoff (or the server's `Retry-After`); real errors (an unknown
  id, a bad query) are reported at once with the API's own message.
* Collecting tens of thousands of records takes hours at 3 s/request, so `fetch_records` saves its
  progress after every complete page and a rerun of the same query continues where it stopped.
  The output is written atomically and described by a manifest (query, counts, sha256), so a
  half-written file is never mistaken for a finished one.

Records are written one JSON object per line in the schema `lmtune.data.records` reads:
`id`, `title`, `abstract`, `categories`, `primary_category`, `published`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import errno
import hashlib
import http.client
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lmtune.errors import UserError
from lmtune.utils.files import atomic_write
from lmtune.utils.progress import Progress

log = logging.getLogger(__name__)

API_URL = "http://export.arxiv.org/api/query"
USER_AGENT = "lmtune/0.1 (arXiv category classification; fine-tuning data and predictions)"
MAX_PAGE_SIZE = 2000  # the API refuses larger `max_results` per request

NS = {
    "atom": "http://www.w3.org/2005/Atom",
    "opensearch": "http://a9.com/-/spec/opensearch/1.1/",
    "arxiv": "http://arxiv.org/schemas/atom",
}
ERROR_ID_PREFIX = "http://arxiv.org/api/errors"

# New-style ids: YYMM.NNNN (2007-2014) or YYMM.NNNNN (2015-). Old-style: archive[.SUBJ]/YYMMNNN.
_NEW_ID = r"(?P<new>\d{2}(?:0[1-9]|1[0-2])\.\d{4,5})"
_OLD_ID = r"(?P<archive>[a-z]+(?:-[a-z]+)*)(?:\.[A-Za-z]+(?:-[A-Za-z]+)*)?/(?P<number>\d{2}(?:0[1-9]|1[0-2])\d{3})"
_ID_RE = re.compile(
    r"^(?:arxiv:|https?://(?:www\.|export\.)?arxiv\.org/(?:abs|pdf)/)?"
    rf"(?:{_NEW_ID}|{_OLD_ID})(?:v\d+)?(?:\.pdf)?/?$",
    re.IGNORECASE,
)
_CATEGORY_RE = re.compile(r"^[a-z]+(?:-[a-z]+)*(?:\.[A-Za-z]+(?:-[A-Za-z]+)*)?$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}")


class ArxivApiError(UserError):
    """The arXiv API could not be reached, or answered with an error or an unusable document.

    `retryable` is True for failures that may go away on their own (a body cut off mid-document,
    a response that is not an Atom feed); `ArxivClient.get` retries those.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


# --------------------------------------------------------------------------------------------- ids


def normalize_id(text: str) -> str:
    """The arXiv id without version ("2401.01234", "math/0301234") from any common spelling of it.

    Versions are dropped because the same paper must dedupe to one record whatever version a page
    shows; an old-style subject class ("math.GT/0301234") is dropped too, since arXiv's canonical id
    is "math/0301234".
    """
    if not isinstance(text, str):
        raise ValueError(f"arXiv id must be a string, got {type(text).__name__}: {text!r}")
    match = _ID_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"not an arXiv id: {text!r}. Expected e.g. '2401.01234', '2401.01234v2', 'arXiv:2401.01234', "
            f"'https://arxiv.org/abs/2401.01234v3' or old-style 'math/0301234'."
        )
    if match["new"]:
        return match["new"]
    return f"{match['archive'].lower()}/{match['number']}"


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class ArxivRecord:
    """One paper in the JSONL schema the training data loader expects."""

    id: str
    title: str
    abstract: str
    categories: list[str]
    primary_category: str
    published: str  # YYYY-MM-DD

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "abstract": self.abstract,
            "categories": list(self.categories),
            "primary_category": self.primary_category,
            "published": self.published,
        }


@dataclass
class FeedPage:
    """One parsed API answer: its entries and the opensearch paging numbers."""

    entries: list[ArxivRecord]
    total_results: int
    start_index: int
    items_per_page: int
    skipped: int = 0  # entries that lacked a usable id/title/abstract/date (logged)


def _collapse(text: str | None) -> str:
    """Titles and abstracts arrive hard-wrapped and indented; training wants single spaces."""
    return " ".join((text or "").split())


def _int(root: ET.Element, path: str) -> int:
    node = root.find(path, NS)
    if node is None or not (node.text or "").strip():
        raise ArxivApiError(f"arXiv answer lacks <{path}>; not an API feed", retryable=True)
    try:
        return int(node.text.strip())
    except ValueError:
        raise ArxivApiError(f"arXiv answer has a non-integer <{path}>: {node.text!r}", retryable=True) from None


def _parse_entry(entry: ET.Element) -> ArxivRecord:
    """Raise ValueError (with the reason) for an entry that cannot become a training record."""
    raw_id = entry.findtext("atom:id", default="", namespaces=NS).strip()
    record_id = normalize_id(raw_id)
    title = _collapse(entry.findtext("atom:title", namespaces=NS))
    abstract = _collapse(entry.findtext("atom:summary", namespaces=NS))
    published = entry.findtext("atom:published", default="", namespaces=NS).strip()
    if not title or not abstract:
        raise ValueError(f"entry {raw_id} has an empty title or summary")
    if not _DATE_RE.match(published):
        raise ValueError(f"entry {raw_id} has no usable <published> date: {published!r}")

    primary_node = entry.find("arxiv:primary_category", NS)
    primary = (primary_node.get("term", "") if primary_node is not None else "").strip()
    feed_order = [c.get("term", "").strip() for c in entry.findall("atom:category", NS)]
    # The primary category is the label; it goes first even when another sorts before it.
    categories = list(dict.fromkeys(c for c in [primary, *feed_order] if c))
    return ArxivRecord(
        id=record_id,
        title=title,
        abstract=abstract,
        categories=categories,
        primary_category=primary or (categories[0] if categories else ""),
        published=published[:10],
    )


def parse_feed(xml_bytes: bytes) -> FeedPage:
    """Parse one Atom answer of the API.

    An error entry (id http://arxiv.org/api/errors#...) raises a non-retryable `ArxivApiError` with the
    API's message; a body that is not well-formed XML (typically cut off mid-transfer) or not an Atom
    feed raises a retryable one. Single entries that cannot be used are skipped and logged, so one odd
    paper does not stall a long collection run at the same page forever.
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise ArxivApiError(f"arXiv answer is not well-formed XML (truncated?): {exc}", retryable=True) from None
    if root.tag != f"{{{NS['atom']}}}feed":
        raise ArxivApiError(f"arXiv answer is not an Atom feed (root element {root.tag!r})", retryable=True)

    entries = root.findall("atom:entry", NS)
    for entry in entries:
        entry_id = entry.findtext("atom:id", default="", namespaces=NS).strip()
        if entry_id.startswith(ERROR_ID_PREFIX):
            message = _collapse(entry.findtext("atom:summary", namespaces=NS)) or entry_id
            raise ArxivApiError(f"arXiv API error: {message}")

    records, skipped = [], 0
    for entry in entries:
        try:
            records.append(_parse_entry(entry))
        except ValueError as exc:
            skipped += 1
            log.warning("skipping unusable arXiv entry: %s", exc)
    return FeedPage(
        entries=records,
        total_results=_int(root, "opensearch:totalResults"),
        start_index=_int(root, "opensearch:startIndex"),
        items_per_page=_int(root, "opensearch:itemsPerPage"),
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------- client


class _TransientError(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait, if it gave one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


def _is_unreachable(reason: object) -> bool:
    """No route to the server at all (no DNS, refused, no network), as opposed to a slow or broken answer."""
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and not isinstance(reason, TimeoutError) and reason.errno in _UNREACHABLE_ERRNOS


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` is either delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


class ArxivClient:
    """Rate-limited, retrying GET of the arXiv query API.

    `max_retries` is the number of attempts per `get` (the first one included). `sleep` and `clock`
    are injectable so tests run without real waiting. `requests_made` counts every HTTP attempt.

    When the very first request cannot reach the server at all (no DNS, connection refused, no route),
    the client reports that at once instead of retrying: that is a machine without network or a wrong
    `arxiv.base_url`, and waiting out a backoff would only delay the message. Once the API has answered,
    the same failures count as transient and are retried.
    """

    def __init__(
        self,
        base_url: str = API_URL,
        min_interval: float = 3.0,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff: float = 2.0,
        user_agent: str = USER_AGENT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1 (it counts attempts), got {max_retries}")
        if min_interval < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("min_interval and backoff must be >= 0 and timeout > 0")
        self.base_url = base_url
        self.min_interval = min_interval
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.user_agent = user_agent
        self.sleep = sleep
        self.clock = clock
        self.requests_made = 0
        self.answers_received = 0
        self._last_request: float | None = None

    def _throttle(self) -> None:
        """Wait until `min_interval` has passed since the previous request (arXiv's terms of use)."""
        if self._last_request is not None:
            wait = self.min_interval - (self.clock() - self._last_request)
            if wait > 0:
                self.sleep(wait)
        self._last_request = self.clock()

    def _attempt(self, url: str) -> FeedPage:
        """One HTTP request; `_TransientError` for what a retry may fix, `ArxivApiError` for the rest."""
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            self.answers_received += 1
            if exc.code == 429 or exc.code >= 500:
                raise _TransientError(
                    f"HTTP {exc.code} {exc.reason}", _retry_after_seconds(exc.headers.get("Retry-After"))
                ) from None
            # The API reports bad queries/ids as HTTP 400 with an error entry; prefer its message.
            try:
                body = exc.read()
            except (OSError, http.client.HTTPException):
                body = b""
            try:
                parse_feed(body)
            except ArxivApiError as parsed:
                if not parsed.retryable:
                    raise ArxivApiError(f"{parsed} (HTTP {exc.code})") from None
            raise ArxivApiError(f"arXiv API answered HTTP {exc.code} {exc.reason} for {url}") from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, refused/reset connections, cut bodies
            reason = getattr(exc, "reason", None) or exc
            if self.answers_received == 0 and _is_unreachable(reason):
                host = urllib.parse.urlsplit(url).netloc
                raise ArxivApiError(
                    f"cannot reach the arXiv API at {host} ({type(reason).__name__}: {reason}); "
                    f"this machine has no network access to it, or arxiv.base_url is wrong"
                ) from None
            raise _TransientError(f"{type(reason).__name__}: {reason}") from None
        self.answers_received += 1
        try:
            return parse_feed(body)
        except ArxivApiError as exc:
            if exc.retryable:
                raise _TransientError(str(exc)) from None
            raise

    def get(self, params: Mapping[str, object]) -> FeedPage:
        """GET the API with `params` (search_query, id_list, start, max_results, ...) and parse the feed."""
        url = f"{self.base_url}?{urllib.parse.urlencode(params)}"
        last_error: _TransientError | None = None
        for attempt in range(self.max_retries):
            self._throttle()
            self.requests_made += 1
            try:
                return self._attempt(url)
            except _TransientError as exc:
                last_error = exc
                if attempt + 1 == self.max_retries:
                    break
                delay = exc.retry_after if exc.retry_after is not None else self.backoff * 2**attempt
                log.warning(
                    "arXiv request failed (%s); attempt %d/%d, retrying in %.1f s",
                    exc,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                self.sleep(delay)
        raise ArxivApiError(
            f"the arXiv API could not be reached or did not answer properly after {self.max_retries} "
            f"attempts ({url}); last error: {last_error}"
        )


# ------------------------------------------------------------------------------------------ queries


def _as_date(value: dt.date | str, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"{name} must be a date or 'YYYY-MM-DD', got {value!r}")


def _date_range(date_from, date_to) -> tuple[dt.date, dt.date] | None:
    """Open ends are filled with bounds that cover all of arXiv (it started in 1991)."""
    if date_from is None and date_to is None:
        return None
    start = _as_date(date_from, "date_from") if date_from is not None else dt.date(1991, 1, 1)
    end = _as_date(date_to, "date_to") if date_to is not None else dt.date(2099, 12, 31)
    if start > end:
        raise ValueError(f"date_from {start} is after date_to {end}")
    return start, end


def search_query(
    categories: Iterable[str], date_from: dt.date | str | None = None, date_to: dt.date | str | None = None
) -> str:
    """The API's `search_query`, e.g. `(cat:cs.CL OR cat:cs.CV) AND submittedDate:[202401010000 TO 202412312359]`.

    Category names are validated so a typo or stray quote fails here, not as an empty result later.
    """
    cats = list(dict.fromkeys(c.strip() for c in ([categories] if isinstance(categories, str) else categories)))
    if not cats:
        raise ValueError("search_query needs at least one category, e.g. ['cs.CL']")
    bad = [c for c in cats if not _CATEGORY_RE.match(c)]
    if bad:
        raise ValueError(f"not arXiv category names: {bad}; expected e.g. 'cs.CL', 'math.GT', 'hep-th'")
    query = " OR ".join(f"cat:{c}" for c in cats)
    if len(cats) > 1:
        query = f"({query})"
    dates = _date_range(date_from, date_to)
    if dates:
        query += f" AND submittedDate:[{dates[0]:%Y%m%d}0000 TO {dates[1]:%Y%m%d}2359]"
    return query


def fetch_by_ids(client: ArxivClient, ids: Iterable[str], chunk_size: int = 100) -> dict[str, ArxivRecord]:
    """The records of the given papers, keyed by normalized id; ids arXiv does not know are absent.

    Any common spelling of an id is accepted (versions, `arXiv:` prefixes, abs/pdf URLs); a string that is
    not an arXiv id raises ValueError before any request is made.
    """
    wanted = list(dict.fromkeys(normalize_id(i) for i in ids))
    found: dict[str, ArxivRecord] = {}
    for i in range(0, len(wanted), chunk_size):
        chunk = wanted[i : i + chunk_size]
        page = client.get({"id_list": ",".join(chunk), "start": 0, "max_results": len(chunk)})
        found.update((r.id, r) for r in page.entries if r.id in chunk)
    return found


# ------------------------------------------------------------------------------------------ fetching


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
    dates = _date_range(date_from, date_to)
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
    bar = Progress(wanted, "fetching from arXiv", unit="records", steps=max(1, math.ceil(wanted / page_size)))
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
    _write_manifest(paths, client, query, categories, dates, max_results, page_size, count, duplicates, skipped, digest)
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


def _write_manifest(
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
    _write_manifest(
        paths,
        client,
        {cat: search_query([cat], date_from, date_to) for cat in categories},
        categories,
        _date_range(date_from, date_to),
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
