"""A generate export over HTTP: an OpenAI-compatible `POST /v1/chat/completions` (LitServe's OpenAI spec), streamed
or not, that the official `openai` client talks to. Each conversation is answered one at a time by the same
`ChatPredictor` as `predict.py` (greedy by default, so the same conversation gets the same text), stopped at the
model's turn closer or `max_tokens`.

Every request is checked whole in the HTTP process before it is queued (`ChatCheck`, behind the same gate as
`/predict`: key, body size and time, queue bound): the messages (roles system, user and assistant in order, ending
with the user's turn; text content, each at most `serve.max_field_chars`), `max_tokens` (at most
`serve.max_new_tokens`), `temperature` (0 to 2; 0 unless given), `n` 1, no tools, no `stop` strings, and that the
last user turn fits the model's `max_length` (earlier exchanges are dropped as in training). A bad request gets a
4xx with one line, never a 500.
"""

from __future__ import annotations

import json

import litserve as ls

from lmtune.commands.serve_limits import ServeLimits
from lmtune.commands.serve_requests import MAX_DEPTH, Refusal, _constant, _depth, _encodable, _number, api_document
from lmtune.core.errors import DataError, first_line
from lmtune.data.conversations import read_messages
from lmtune.evaluation.predictor import pick_device

MAX_MESSAGES = 256
ROLE_NAMES = {"developer": "system"}  # the OpenAI API's newer name for the system turn
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs", "stop")


def parse_chat_request(body: bytes, limits: ServeLimits) -> dict:
    """The request as the worker takes it (model, messages, max_tokens, temperature, stream, n=1), or a `Refusal`
    (status, one line). Never raises another exception, whatever the bytes."""
    example = '{"messages": [{"role": "user", "content": "..."}]}'
    try:
        request = json.loads(body, parse_int=_number, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Refusal(400, f"the body is not JSON ({getattr(e, 'msg', 'not UTF-8')}); send e.g. {example}") from None
    except RecursionError:
        raise Refusal(400, f"JSON nested over {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise Refusal(400, f"the body is not usable JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(request, dict):
        raise Refusal(400, f"send one JSON object, e.g. {example}")
    if _depth(request) > MAX_DEPTH:
        raise Refusal(400, f"JSON nested over {MAX_DEPTH} levels")
    given = [k for k in UNSUPPORTED if request.get(k) not in (None, [], False)]
    if given:
        raise Refusal(422, f"{given[0]} is not supported: the answer is text, ended by the model's turn closer")
    model = request.get("model", "")
    if not isinstance(model, str) or len(model) > 200:
        raise Refusal(422, "model must be a string of at most 200 characters")
    raw = request.get("messages")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MESSAGES:
        raise Refusal(422, f"messages must be a list of 1 to {MAX_MESSAGES} messages, e.g. {example}")
    messages = [_message(m, k, limits.max_field_chars) for k, m in enumerate(raw)]
    checked, problem = read_messages(messages, to_answer=True)
    if problem:
        raise Refusal(422, f"messages: {problem}")
    if checked[-1]["role"] != "user":
        raise Refusal(422, "messages: the last message must be the user's (the turn to answer)")
    n = request.get("n", 1)
    if n not in (1, None) or type(n) is bool:
        raise Refusal(422, "n must be 1: one answer per request")
    stream = request.get("stream", False)
    if type(stream) is not bool and stream is not None:
        raise Refusal(422, "stream must be true or false")
    max_tokens = _max_tokens(request, limits.max_new_tokens)
    temperature = request.get("temperature", 0)
    if temperature is None:
        temperature = 0
    if type(temperature) not in (int, float) or not 0 <= temperature <= 2:
        raise Refusal(422, "temperature must be a number from 0 (greedy: the same answer every time) to 2")
    return {
        "model": model,
        "messages": checked,
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "stream": bool(stream),
        "n": 1,
    }


def _message(m, k: int, max_chars: int) -> dict:
    """One message with text content: a string, or a list of `{"type": "text", "text": ...}` parts (joined)."""
    if not isinstance(m, dict):
        raise Refusal(422, f"messages[{k}] must be an object with a role and a content")
    role = m.get("role")
    if not isinstance(role, str):  # checked before the lookup below: an object or a list is not hashable
        raise Refusal(422, f"messages[{k}].role must be system, user or assistant")
    role = ROLE_NAMES.get(role, role)
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise Refusal(422, f"messages[{k}].content: only text parts are supported")
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str) or not content.strip():
        raise Refusal(422, f"messages[{k}].content must be non-empty text")
    if len(content) > max_chars:
        raise Refusal(422, f"messages[{k}].content is over {max_chars} characters (serve.max_field_chars)")
    _encodable(f"messages[{k}].content", content)
    return {"role": role, "content": content}


def _max_tokens(request: dict, limit: int) -> int:
    """`max_completion_tokens` (OpenAI's newer name) or `max_tokens`; each one given must be in range."""
    for name in ("max_tokens", "max_completion_tokens"):
        given = request.get(name)
        if given is not None and (type(given) is not int or not 1 <= given <= limit):
            raise Refusal(422, f"{name} must be a whole number from 1 to {limit} (serve.max_new_tokens)")
    given = request.get("max_completion_tokens", request.get("max_tokens"))
    return limit if given is None else given


def chat_openapi_schema(limits: ServeLimits) -> dict:
    """The chat route as clients (and Schemathesis) read it from /openapi.json: what `parse_chat_request` takes
    (FastAPI's own schema would describe LitServe's request model, which accepts what the check refuses)."""
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_field_chars, "pattern": r"\S"}
    nullable = lambda schema: {"anyOf": [schema, {"type": "null"}]}  # noqa: E731  (null: the default, as OpenAI's)
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]}, "content": text},
    }
    request = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "model": {"type": "string", "maxLength": 200},
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": message},
            "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens}),
            "max_completion_tokens": nullable({"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens}),
            "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
            "stream": nullable({"type": "boolean"}),
            "n": nullable({"const": 1}),
        },
    }
    choice = {"type": "object", "required": ["index"], "properties": {"index": {"type": "integer"}}}
    completion = {
        "type": "object",
        "required": ["choices"],
        "properties": {"choices": {"type": "array", "items": choice}, "usage": {"type": "object"}},
    }
    detail = {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": detail}}
    errors = {
        "400": "not JSON, or not one object",
        "401": "missing or wrong key (Authorization: Bearer, or X-API-Key)",
        "408": "the request took too long to arrive",
        "413": "the body is too long",
        "422": "messages out of order or not text, a setting out of range or not supported, or a last user turn "
        "that cannot fit the model's max_length",
        "503": "busy: too many requests waiting (Retry-After)",
        "504": "the model did not answer in time",
    }
    # each server-sent event's data: a chat.completion.chunk as JSON text, then "[DONE]"
    events = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "minLength": 1}}}
    answer = {"application/json": {"schema": completion}, "text/event-stream": {"schema": events}}
    responses = {"200": {"description": "the answer, or its pieces as server-sent events", "content": answer}}
    responses |= {
        code: {"description": what, "content": {"application/json": {"schema": error}}} for code, what in errors.items()
    }
    summary = "the assistant's answer to the conversation's last user turn"
    return api_document(
        "lmtune chat", {"type": "http", "scheme": "bearer"}, ChatCheck.path, summary, request, responses
    )


class ChatCheck:
    """The generate model's requests (`POST /v1/chat/completions`), checked whole (see `parse_chat_request`) and
    fitted to `max_length` as the worker will fit them."""

    path = "/v1/chat/completions"

    def __init__(self, formatter, limits: ServeLimits):
        self.formatter, self.limits = formatter, limits

    async def check(self, body: bytes) -> dict:
        request = parse_chat_request(body, self.limits)
        try:
            self.formatter.fit_prompt(request["messages"])
        except DataError as e:
            raise Refusal(422, first_line(e, 300)) from None
        return request


class ChatAPI(ls.LitAPI):
    """The model side: one conversation in, its answer's text out as it is written (LitServe's inference worker)."""

    def __init__(self, ckpt: str, base: str | None, cache_dir: str, device: str, precision: str | None):
        super().__init__(spec=ls.OpenAISpec(), max_batch_size=1)
        self.ckpt, self.base, self.cache_dir = ckpt, base, cache_dir
        self.device_name, self.precision = device, precision

    def setup(self, device) -> None:
        from lmtune.tasks.generate.predictor import ChatPredictor

        options = {"precision": self.precision} if self.precision else {}
        self.predictor = ChatPredictor.from_export(
            self.ckpt, self.cache_dir, pick_device(self.device_name), base=self.base, **options
        )

    def decode_request(self, request) -> dict:  # checked and normalized by ChatCheck
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        return {"messages": messages, "max_tokens": request.max_tokens, "temperature": request.temperature}

    def predict(self, request: dict):
        for piece in self.predictor.stream(
            request["messages"], max_new_tokens=request["max_tokens"], temperature=request["temperature"]
        ):
            if isinstance(piece, str):
                yield {"role": "assistant", "content": piece}
            else:  # the finished answer's token counts; the turn closer is not counted, so a cut answer (LitServe
                # reports every finish as "stop") is one with completion_tokens == max_tokens
                written = piece.tokens - (piece.finish_reason == "stop")
                usage = {"prompt_tokens": piece.prompt_tokens, "completion_tokens": written}
                yield {"role": "assistant", "content": "", **usage, "total_tokens": sum(usage.values())}
