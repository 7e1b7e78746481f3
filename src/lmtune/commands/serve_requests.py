"""Every request checked whole in the HTTP process, before it is queued for the model, so one bad request cannot
fail the batch it would have joined: the API key (every route but /health), the queue's bound, the body (size,
time to arrive, JSON with bounded depth and numbers), every column (a non-empty string, at most
`serve.max_field_chars`, encodable as UTF-8), the id, and whether the row fits the model's `max_length` at all
(tokenized here as the model's worker will). A refused request gets a 4xx (or 503) with a one-line JSON error
`{"error": "..."}`; so does anything else the app answers with a 4xx or 5xx.

An arXiv model also takes `{"arxiv_id": ...}`: the paper is looked up through one `PaperLookup` per HTTP process
(its own thread, bounded, cached, with a deadline), never through the event loop's default thread pool, so a slow
arXiv delays only the requests that wait on it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from lmtune.arxiv.feed import ArxivApiError
from lmtune.arxiv.ids import normalize_id
from lmtune.arxiv.lookup import LookupBusy, PaperLookup
from lmtune.commands.serve_limits import LimitLog, ServeLimits
from lmtune.core.errors import DataError, first_line
from lmtune.data.records import clean_text

log = logging.getLogger(__name__)

MAX_DEPTH = 8  # a request is one flat object; anything nested deeper is refused before it is looked at
MAX_DIGITS = 20  # an id may be a 64-bit integer; longer numbers are refused before int() sees them
MAX_ID_CHARS = 200
OPEN = ("/health",)  # answered without the API key (load balancers probe it)


class Refusal(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def _number(text: str):
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise Refusal(400, f"a number with over {MAX_DIGITS} digits; send ids as strings")
    return int(text)


def _constant(name: str):
    raise Refusal(400, f"{name} is not JSON")


def _depth(value, level: int = 1) -> int:
    if level > MAX_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(v, level + 1) for v in children), default=level)


def parse_request(body: bytes, columns: list[str], max_field_chars: int, example: str) -> dict:
    """The request's fields, id and arXiv id, checked; a `Refusal` (status, one line) for anything else. Never
    raises another exception, whatever the bytes (a hypothesis test holds it to that)."""
    try:
        request = json.loads(body, parse_int=_number, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        message = f"the body is not JSON ({getattr(e, 'msg', 'not UTF-8')}); send one object, e.g. {example}"
        raise Refusal(400, message) from None
    except RecursionError:
        raise Refusal(400, f"JSON nested over {MAX_DEPTH} levels; send one flat object, e.g. {example}") from None
    except ValueError as e:  # what json.loads itself refuses besides syntax (e.g. float digits beyond its limit)
        raise Refusal(400, f"the body is not usable JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(request, dict):
        raise Refusal(400, f"send one JSON object, e.g. {example}")
    if _depth(request) > MAX_DEPTH:
        raise Refusal(400, f"JSON nested over {MAX_DEPTH} levels; send one flat object, e.g. {example}")
    request_id = request.get("id")
    if type(request_id) is float and request_id.is_integer():  # 430.0 is the integer 430 in JSON
        request_id = int(request_id)
    if request_id is not None and not (
        (type(request_id) is int and -(2**63) <= request_id < 2**63)
        or (isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS)
    ):
        raise Refusal(422, f"id must be a string of 1 to {MAX_ID_CHARS} characters, a 64-bit integer or null")
    if isinstance(request_id, str):
        _encodable("id", request_id)
    if "arxiv_id" in request:
        raw = request["arxiv_id"]
        if not isinstance(raw, str) or len(raw) > MAX_ID_CHARS:
            raise Refusal(422, f"arxiv_id must be a string of at most {MAX_ID_CHARS} characters, e.g. 1706.03762")
        try:
            return {"arxiv_id": normalize_id(raw), "id": request_id}
        except ValueError as e:
            raise Refusal(422, f"arxiv_id: {first_line(e, 300)}") from None
    missing = [c for c in columns if c not in request]
    if missing:
        raise Refusal(422, f"missing column(s) {', '.join(missing)}; send {example}")
    wrong = [c for c in columns if not isinstance(request[c], str) or not request[c].strip()]
    if wrong:
        raise Refusal(422, f"column(s) {', '.join(wrong)} must be non-empty strings")
    long = [c for c in columns if len(request[c]) > max_field_chars]
    if long:
        raise Refusal(422, f"column(s) {', '.join(long)} over {max_field_chars} characters (serve.max_field_chars)")
    for c in columns:
        _encodable(c, request[c])
    return {"fields": {c: clean_text(request[c]) for c in columns}, "id": request_id}


def _encodable(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Refusal(422, f"{name}: not text (an unpaired surrogate \\u{ord(e.object[e.start]):04x})") from None


def api_document(title: str, scheme: dict, route: str, summary: str, body: dict, responses: dict) -> dict:
    """A server's /openapi.json: its one POST route (body and every answer it can give) and /health, keyed."""
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "components": {"securitySchemes": {"key": scheme}},
        "security": [{"key": []}],
        "paths": {
            route: {
                "post": {
                    "summary": summary,
                    "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                    "responses": responses,
                }
            },
            "/health": {
                "get": {
                    "summary": "200 once the model is loaded",
                    "security": [],
                    "responses": {"200": {"description": "ok"}, "503": {"description": "not ready"}},
                }
            },
        },
    }


class RowCheck:
    """A classifier's request (`POST /predict`): one row of the task's columns (or an arXiv id, looked up), fitted to
    the model's `max_length` as the worker will fit it."""

    path = "/predict"

    def __init__(self, formatter, limits: ServeLimits, lookup_settings: dict | None, limit_log: LimitLog):
        self.formatter, self.limits, self.limit_log = formatter, limits, limit_log
        self.columns = list(self.formatter.columns)
        self.example = json.dumps({c: "..." for c in self.columns})
        self.lookup = None
        if lookup_settings is not None:
            self.lookup = PaperLookup(
                lookup_settings, limits.lookup_max_pending, limits.lookup_cache_size, limits.lookup_cache_ttl
            )

    async def check(self, body: bytes) -> dict:
        """The request as the model's worker takes it (`{"fields", "id"}`), or a `Refusal`."""
        request = parse_request(body, self.columns, self.limits.max_field_chars, self.example)
        if "arxiv_id" in request:
            if self.lookup is None:
                raise Refusal(422, f"this model's prompt reads {', '.join(self.columns)}: send them, not an arxiv_id")
            fields = await self.look_up(request["arxiv_id"])
            request = {"fields": {c: clean_text(fields[c]) for c in self.columns}, "id": request["arxiv_id"]}
        try:
            self.formatter.fit_prompts([request["fields"]])
        except DataError:
            cut = self.formatter.truncate_column or "its longest column"
            raise Refusal(
                422,
                f"the row does not fit this model's max_length ({self.formatter.max_length} tokens) even with {cut} "
                "shortened; shorten the other column(s)",
            ) from None
        return request

    async def look_up(self, paper_id: str) -> dict:
        timeout = self.limits.lookup_timeout
        try:
            future = self.lookup.submit(paper_id)
        except LookupBusy:
            pending = self.limits.lookup_max_pending
            self.limit_log.hit("serve.lookup.max_pending", f"{pending} arXiv lookups waiting: new ones get 503")
            raise Refusal(
                503, f"{pending} arXiv lookups are waiting (serve.lookup.max_pending); retry soon, or send the text", 5
            ) from None
        answer = asyncio.wrap_future(future)  # shared by every request waiting for this id
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even when nobody waits any more
        try:
            texts = await asyncio.wait_for(asyncio.shield(answer), timeout)
        except asyncio.TimeoutError:
            self.limit_log.hit("serve.lookup.timeout", f"arXiv lookups that took over {timeout} s")
            raise Refusal(
                504, f"arXiv did not answer within {timeout} s (serve.lookup.timeout); send the text"
            ) from None
        except ArxivApiError as e:
            self.limit_log.hit("arxiv", f"arXiv lookups failing: {first_line(e, 300)}")  # the upstream URL stays here
            raise Refusal(502, "the arXiv API did not answer; retry later, or send the text instead") from None
        if texts is None:
            raise Refusal(404, f"arXiv has no paper with id {paper_id}")
        return texts


class RequestCheck:
    """ASGI middleware in front of LitServe's app (see the module's docstring): the key on every route but /health,
    then the checker's route's requests checked whole (`RowCheck`, `ChatCheck`). Built in each HTTP worker process
    when it starts, so the tokenizer and the lookup thread belong to that process."""

    def __init__(self, app, checker_factory, limits: ServeLimits, api_key: str | None, limit_log: LimitLog):
        self.app, self.limits, self.api_key, self.limit_log = app, limits, api_key, limit_log
        self.checker = checker_factory()
        self.queued = 0  # requests passed on to the model and not answered yet

    def _key_ok(self, headers: dict) -> bool:
        """`X-API-Key: <key>`, or `Authorization: Bearer <key>` (what the OpenAI client sends)."""
        key = headers.get(b"x-api-key", b"")
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer ":
            key = key or bearer[7:].strip()
        return hmac.compare_digest(key, self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        openai = scope["path"].startswith("/v1/")  # the OpenAI-compatible routes answer errors in its shape
        app_send = _errors_as_one_line(send, openai)
        received = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN and not self._key_ok(received):
            refusal = Refusal(401, "missing or wrong X-API-Key header (or Authorization: Bearer)")
            return await _error(send, refusal, openai=openai)
        if scope["method"] != "POST" or scope["path"] != self.checker.path:
            return await self.app(scope, receive, app_send)
        try:
            body = await self.read_body(received.get(b"content-length"), receive)
            if body is None:
                return None  # the client went away
            payload = await self.checker.check(body)
            if self.queued >= self.limits.max_queue:  # checked last: nothing awaits between it and `queued += 1`
                self.limit_log.hit(
                    "serve.max_queue",
                    f"{self.limits.max_queue} requests waiting for the model: new ones get 503 with Retry-After",
                )
                raise Refusal(503, f"{self.limits.max_queue} requests are waiting (serve.max_queue); retry soon", 1)
        except Refusal as refusal:
            return await _error(send, refusal, openai=openai)
        forwarded = json.dumps(payload).encode()
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # LitServe listens for the client going away
            sent = True
            return {"type": "http.request", "body": forwarded, "more_body": False}

        # as JSON whatever the client declared (`curl -d` says form data)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-length", str(len(forwarded)).encode()), (b"content-type", b"application/json")]
        self.queued += 1
        try:
            return await self.app({**scope, "headers": headers}, replay, app_send)
        finally:
            self.queued -= 1

    async def read_body(self, declared: bytes | None, receive) -> bytes | None:
        """The body, within `serve.max_body_bytes` (its declared length checked first) and `serve.body_timeout`."""
        limit = self.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Refusal(413, f"body over {limit} bytes (serve.max_body_bytes)")
        body = bytearray()

        async def collect() -> bytes | None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body.extend(message.get("body", b""))
                if len(body) > limit:
                    raise Refusal(413, f"body over {limit} bytes (serve.max_body_bytes)")
                if not message.get("more_body", False):
                    return bytes(body)

        try:
            return await asyncio.wait_for(collect(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            self.limit_log.hit("serve.body_timeout", f"requests whose body took over {self.limits.body_timeout} s")
            message = f"the body did not arrive within {self.limits.body_timeout} s (serve.body_timeout)"
            raise Refusal(408, message) from None


def _errors_as_one_line(send, openai: bool = False):
    """`send` for the app's answers: any 4xx or 5xx body becomes `{"error": "<one line>"}` (FastAPI and LitServe
    answer `{"detail": ...}`, sometimes a list)."""
    held = {}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held["start"], held["body"] = message, b""
            return None
        if "start" not in held:
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return None
        start = held.pop("start")
        status = start["status"]
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        refusal = Refusal(status, _error_text(held.pop("body"), status))
        return await _error(send, refusal, kept, openai)  # Allow, Retry-After kept

    return wrapped


def _error_text(body: bytes, status: int) -> str:
    try:
        detail = json.loads(body)
        detail = detail.get("error") or detail.get("detail") if isinstance(detail, dict) else detail
    except (ValueError, UnicodeDecodeError):
        detail = body.decode(errors="replace")
    if status >= 500:
        return {504: "the model did not answer in time (serve.timeout); retry later"}.get(
            status, "the server could not answer this request; it is logged"
        )
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    return " ".join(str(detail or status).split())[:300]


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 422: "invalid_request_error"}


async def _error(send, refusal: Refusal, extra_headers=(), openai: bool = False) -> None:
    """The one-line error: `{"error": "..."}`, or on the OpenAI-compatible routes the OpenAI API's shape
    (`{"error": {"message", "type", "code"}}`), which its clients read the message from."""
    message = " ".join(refusal.message.split())
    error = {"message": message, "type": ERROR_TYPES.get(refusal.status, "server_error"), "code": None}
    body = json.dumps({"error": error if openai else message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if refusal.retry_after is not None:
        headers.append((b"retry-after", str(refusal.retry_after).encode()))
    headers += list(extra_headers)
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
