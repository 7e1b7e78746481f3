"""Papers by arXiv id: the text predict and serve fetch when given an id (`arxiv_id=`, a file's `id` column,
`{"arxiv_id": ...}`) instead of the text, for a model whose prompt reads only what a paper gives."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future

from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.feed import COLUMNS, ArxivApiError, ArxivRecord
from lmtune.arxiv.ids import normalize_id
from lmtune.core.errors import UserError


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


def fetchable(columns: Iterable[str]) -> bool:
    """Whether a prompt over `columns` can be filled from a paper fetched by id."""
    return set(columns) <= set(COLUMNS)


def check_fetchable(columns: list[str], what: str) -> None:
    if not fetchable(columns):
        raise UserError(
            f"{what} fetches a paper's title and abstract, but this model's prompt reads {', '.join(columns)}; "
            f"give the text instead: input=<file with those columns> or row='{{{columns[0]}: ...}}'."
        )


def canonical_id(text, where: str) -> str:
    """`normalize_id`, its refusal a UserError that names `where` the id came from."""
    try:
        return normalize_id(str(text))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def fetch_texts(settings: Mapping, ids: list[str]) -> dict[str, dict[str, str]]:
    """The prompt's columns of each paper arXiv knows, by its id; `settings`: the `arxiv` config (client)."""
    return fetch_texts_with(ArxivClient(**settings), ids)


def fetch_texts_with(client: ArxivClient, ids: list[str]) -> dict[str, dict[str, str]]:
    return {i: {"title": r.title, "abstract": r.abstract} for i, r in fetch_by_ids(client, ids).items()}


def texts_by_id(settings: Mapping, raw_ids: list, columns: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(id, text) of each of `arxiv_id=2401.01234` (or a list), in order: every id must exist on arXiv."""
    check_fetchable(columns, "arxiv_id=")
    ids = [canonical_id(i, f"arxiv_id={i}") for i in raw_ids]
    found = fetch_texts(settings, ids)
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise UserError(
            f"arXiv has no paper with id {', '.join(unknown)} (asked {settings.get('base_url')}); check the id, "
            f"or give the text with title=... abstract=..."
        )
    return [(i, found[i]) for i in ids]


class LookupBusy(Exception):
    """More ids are waiting than `PaperLookup.max_pending`."""


class PaperLookup:
    """Papers by id for a server, so that lookups cannot hurt it or arXiv: one client for the whole server (arXiv's
    interval between requests, a deadline on each), the ids asked for meanwhile fetched together (one request for up
    to 100), answers cached (papers for `cache_ttl` s, unknown ids for a minute), at most `max_pending` ids waiting
    (`LookupBusy` beyond), and a thread of its own, so that a slow arXiv delays only the requests that wait on it.

    `submit(id)` returns a `concurrent.futures.Future` of `{"title", "abstract"}` (None: arXiv has no such paper);
    an upstream failure is an `ArxivApiError` in the future, whose message may name the upstream URL (log it, do not
    show it to clients)."""

    CHUNK = 100  # ids per request (arXiv answers id_list queries of this size in one page)
    MISSING_TTL = 60.0

    def __init__(self, settings: Mapping, max_pending: int, cache_size: int, cache_ttl: float, clock=time.monotonic):
        self.client = ArxivClient(**settings)
        self.max_pending, self.cache_size, self.cache_ttl, self.clock = max_pending, cache_size, cache_ttl, clock
        self.cache: OrderedDict[str, tuple[float, dict | None]] = OrderedDict()  # id -> (expires, texts)
        self.waiting: dict[str, Future] = {}  # not fetched yet
        self.fetching: dict[str, Future] = {}  # in the request being made
        self.wake = threading.Condition()
        threading.Thread(target=self._run, name="arxiv-lookup", daemon=True).start()

    def submit(self, paper_id: str) -> Future:
        with self.wake:
            if (hit := self.cache.get(paper_id)) is not None and hit[0] > self.clock():
                self.cache.move_to_end(paper_id)
                return _done(hit[1])
            if (same := self.waiting.get(paper_id) or self.fetching.get(paper_id)) is not None:
                return same  # asked for already: one answer for both
            if len(self.waiting) + len(self.fetching) >= self.max_pending:
                raise LookupBusy
            future = self.waiting[paper_id] = Future()
            self.wake.notify()
            return future

    def _run(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.waiting)
                ids = list(self.waiting)[: self.CHUNK]
                for i in ids:
                    self.fetching[i] = self.waiting.pop(i)
            try:
                found, error = fetch_texts_with(self.client, ids), None
            except Exception as e:  # ArxivApiError, or anything else: every waiter gets its answer
                found, error = {}, e if isinstance(e, ArxivApiError) else ArxivApiError(f"{type(e).__name__}: {e}")
            with self.wake:
                now = self.clock()
                for i in ids:
                    future = self.fetching.pop(i)
                    if error is not None:
                        future.set_exception(error)
                        continue
                    texts = found.get(i)
                    self.cache[i] = (now + (self.cache_ttl if texts else self.MISSING_TTL), texts)
                    self.cache.move_to_end(i)
                    future.set_result(texts)
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)


def _done(result) -> Future:
    future = Future()
    future.set_result(result)
    return future


def verbatim_ids(overrides: list[str]) -> str | list[str] | None:
    """`arxiv_id` exactly as typed: Hydra reads `arxiv_id=2401.01230` as the float 2401.0123, losing a digit."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "arxiv_id":
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                return [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            return value.strip("'\"")
    return None
