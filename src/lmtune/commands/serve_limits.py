"""The server's bounds on what clients may hold: connections, time to send a request, requests waiting, arXiv
lookups. Every bound is a `serve.*` setting with a safe default (conf/serve.yaml), and each one reached is logged
once a minute with how often it was hit, never once per request.

The connection bounds live in the HTTP protocol (uvicorn's h11 protocol, extended): a connection beyond
`serve.max_connections` is answered 503 at once, and a connection that has not sent a request's headers
within `serve.header_timeout` s (idle after connecting, or sending them a byte at a time) is answered 408. Both
answers are followed by a bounded lingering close (`LINGER_S`, at most `MAX_LINGERING` connections at a time, not
counted in `serve.max_connections`): closing a socket that still holds unread request bytes sends a reset, and the
client would lose the answer.
Idle kept-alive connections close after `serve.keep_alive` s (uvicorn's own timer)."""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from dataclasses import dataclass, fields

from uvicorn.protocols.http.h11_impl import H11Protocol

from lmtune.core.errors import UserError

log = logging.getLogger(__name__)

LINGER_S = 2.0  # s an answered-and-refused connection is still read (and discarded) so the client gets the answer
MAX_LINGERING = 32  # beyond this many lingering at once, refused connections close at once (file descriptors)


@dataclass(frozen=True)
class ServeLimits:
    """`serve.*` of conf/serve.yaml, checked."""

    max_batch_size: int
    batch_timeout: float
    timeout: float  # s a request may wait for the model (504 after)
    max_body_bytes: int
    max_field_chars: int
    max_new_tokens: int  # the longest answer a chat request may ask for (generate exports)
    max_connections: int
    max_queue: int
    header_timeout: float
    body_timeout: float
    keep_alive: float
    lookup_max_pending: int
    lookup_timeout: float
    lookup_cache_size: int
    lookup_cache_ttl: float

    @classmethod
    def of(cls, serve_cfg) -> ServeLimits:
        given = {**serve_cfg}
        lookup = given.pop("lookup", None) or {}
        given.update({f"lookup_{k}": v for k, v in lookup.items()})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            hint = " (the API key comes from the environment: LMTUNE_API_KEY)" if "api_key" in unknown else ""
            raise UserError(f"serve.{unknown[0]}: not a setting of serve.py{hint}; see conf/serve.yaml.")
        bad = []
        for f in fields(cls):
            value = given.get(f.name)
            zero_ok = f.name == "batch_timeout"
            number = type(value) in ((int,) if f.type == "int" else (int, float))
            if not number or value < 0 or (value == 0 and not zero_ok):
                setting = f.name.replace("lookup_", "lookup.")
                bad.append(f"serve.{setting}={value}")
        if bad:
            raise UserError(
                f"{', '.join(bad)}: use a positive {'number' if len(bad) == 1 else 'number for each'} "
                "(serve.batch_timeout may be 0); see conf/serve.yaml."
            )
        if given["batch_timeout"] >= given["timeout"]:
            raise UserError(
                f"serve.batch_timeout={given['batch_timeout']} must be below serve.timeout={given['timeout']}."
            )
        return cls(**{name: given[name] for name in names})

    def check_open_files(self) -> None:
        """Every allowed connection needs a file descriptor: raise the soft limit to fit (up to the hard one), or
        say which setting to lower, before minutes of model loading. Without this, accept() fails under load and
        clients see connection resets that nothing logs."""
        needed = self.max_connections + MAX_LINGERING + 256  # + the model, tokenizer, logs, LitServe's pipes
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            if hard == resource.RLIM_INFINITY or hard >= needed:
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
                return
            raise UserError(
                f"serve.max_connections={self.max_connections} needs {needed} open files, but this process may open "
                f"{hard} (ulimit -n); lower serve.max_connections or raise the limit."
            )


class LimitLog:
    """One log line per limit and minute, saying how many times it was hit since the last line."""

    EVERY = 60.0

    def __init__(self, clock=time.monotonic):
        self.clock, self.last, self.count, self.lock = clock, {}, {}, threading.Lock()

    def hit(self, limit: str, message: str) -> None:
        with self.lock:
            self.count[limit] = self.count.get(limit, 0) + 1
            if limit in self.last and self.clock() - self.last[limit] < self.EVERY:
                return
            times, self.count[limit], self.last[limit] = self.count[limit], 0, self.clock()
        log.warning("%s (%s: %d time%s since the last such line)", message, limit, times, "" if times == 1 else "s")


def canned_response(status: int, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response with a one-line JSON error, for answers written before any request is read."""
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}"]
    head += [f"retry-after: {retry_after}"] * (retry_after is not None) + ["connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _InvalidRequests(logging.Filter):
    """uvicorn logs every request it cannot parse; a fuzzer or a scanner sends thousands: counted instead."""

    def __init__(self, limit_log: LimitLog):
        super().__init__()
        self.limit_log = limit_log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "Invalid HTTP request received.":
            self.limit_log.hit("invalid HTTP", "answered 400 to requests that are not HTTP/1.1")
            return False
        return True


def guarded_protocol(limits: ServeLimits, limit_log: LimitLog) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection cap and the header deadline (see the module's docstring)."""
    logging.getLogger("uvicorn.error").addFilter(_InvalidRequests(limit_log))

    class GuardedH11Protocol(H11Protocol):
        lingering = 0  # connections of this server answered and waiting for their client to close

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.headers_due = self.linger_due = None
            if len(self.connections) > limits.max_connections:
                limit_log.hit(
                    "serve.max_connections",
                    f"{limits.max_connections} connections open: new ones get 503 and are closed; raise "
                    "serve.max_connections if this machine can hold more",
                )
                busy = f"the server holds {limits.max_connections} connections (serve.max_connections); retry soon"
                self._answer_and_close(canned_response(503, busy, retry_after=1))
                return
            self._arm()

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self.headers_due = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.headers_due is not None:
                self.headers_due.cancel()
                self.headers_due = None

        def _answer_and_close(self, response: bytes) -> None:
            """Write a whole answer, half-close, and discard what the client still sends until it closes or
            `LINGER_S` pass (see the module's docstring)."""
            self.transport.write(response)
            cls = type(self)
            if cls.lingering >= MAX_LINGERING or not self.transport.can_write_eof():
                self.transport.close()
                return
            cls.lingering += 1
            self.connections.discard(self)  # answered: no longer one of the serve.max_connections being served
            self.transport.write_eof()
            self.linger_due = self.loop.call_later(LINGER_S, self.transport.close)

        def eof_received(self):
            if self.linger_due is not None:
                self.transport.close()
                return None
            return super().eof_received()

        def data_received(self, data: bytes) -> None:
            if self.linger_due is not None:
                return  # answered already: read only so that closing does not reset
            if self.headers_due is None and self._waiting_for_headers():
                self._arm()  # the next request on a kept-alive connection has its own deadline
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self.linger_due is not None:
                self.linger_due.cancel()
                self.linger_due = None
                type(self).lingering -= 1
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self.headers_due = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                limit_log.hit(
                    "serve.header_timeout",
                    f"closed connections that sent no complete request headers within {limits.header_timeout} s",
                )
                message = f"no complete request headers within {limits.header_timeout} s (serve.header_timeout)"
                self._answer_and_close(canned_response(408, message))

    return GuardedH11Protocol
