"""A small, polite client for the public arXiv API (Atom feed).

Why it looks the way it does:

* arXiv asks API users to make at most one request every 3 seconds, so `ArxivClient` spaces *every*
  HTTP request (retries included) by `min_interval`, and sends a descriptive User-Agent.
* The API is flaky in practice: timeouts, 5xx/429 answers and bodies cut off mid-document all happen.
  These are retried with exponential backoff (or the server's `Retry-After`); real errors (an unknown
  id, a bad query) are reported at once with the API's own message."""

from __future__ import annotations

import datetime as dt
import email.utils
import errno
import http.client
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping

from lmtune.arxiv.feed import ArxivApiError, FeedPage, parse_feed

log = logging.getLogger(__name__)

API_URL = "http://export.arxiv.org/api/query"
USER_AGENT = "lmtune/0.1 (arXiv category classification; fine-tuning data and predictions)"


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
