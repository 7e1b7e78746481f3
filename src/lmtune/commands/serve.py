"""`serve(cfg)`: a trained export over HTTP on LitServe: `POST /predict` with one row of the task's columns (or,
for an arXiv model, `{"arxiv_id": ...}`) answers `{"label", "probs"}` exactly as `predict.py` does: the same
`Predictor` (the export's formatting, rank scoring over the label set), with requests batched dynamically.

Every request is checked in the HTTP process before it is queued (`RequestCheck`): malformed JSON, a missing or
non-string column, an over-long body, an unknown arXiv id or a wrong API key is a 4xx with a one-line JSON error
(`{"error": "..."}`) and never reaches the model, so one bad request cannot fail the batch it would have joined.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
from collections.abc import Callable

import litserve as ls
from omegaconf import DictConfig, OmegaConf

from lmtune.artifacts.export import read_export
from lmtune.arxiv.lookup import fetchable, request_by_id
from lmtune.core.errors import UserError
from lmtune.data.formatting import template_columns
from lmtune.data.records import clean_text
from lmtune.evaluation.predictor import Prediction, Predictor, Row, pick_device

log = logging.getLogger(__name__)


class ClassifierAPI(ls.LitAPI):
    """The model side: rows in, predictions out, a batch at a time (in LitServe's inference worker process)."""

    def __init__(self, ckpt: str, base: str | None, cache_dir: str, device: str, precision: str | None, **batching):
        super().__init__(**batching)
        self.ckpt, self.base, self.cache_dir = ckpt, base, cache_dir
        self.device_name, self.precision = device, precision

    def setup(self, device) -> None:  # LitServe's device name; ours follows `device=` as predict.py does
        options = {"precision": self.precision} if self.precision else {}
        device = pick_device(self.device_name)
        self.predictor = Predictor.from_export(self.ckpt, self.cache_dir, device, base=self.base, **options)

    def decode_request(self, request: dict) -> Row:
        return Row(request["fields"], request.get("id"))  # checked and normalized by RequestCheck

    def batch(self, rows: list[Row]) -> list[Row]:
        return list(rows)

    def predict(self, rows):
        return self.predictor.predict(rows if isinstance(rows, list) else [rows])

    def unbatch(self, predictions: list[Prediction]) -> list[Prediction]:
        return predictions

    def encode_response(self, prediction) -> dict:
        if isinstance(prediction, list):  # without batching, predict answered a list of one
            (prediction,) = prediction
        return {"label": prediction.label, "probs": prediction.probs, "truncated": prediction.truncated}


class RequestCheck:
    """ASGI middleware in front of `POST /predict`: the API key, the body's size and JSON, the task's columns (or
    an arXiv id, fetched here by `fetch`), then the request passes on as `{"fields": {...}, "id": ...}`."""

    def __init__(self, app, columns: list[str], max_bytes: int, api_key: str | None, fetch: Callable | None):
        self.app, self.columns, self.max_bytes, self.api_key, self.fetch = app, columns, max_bytes, api_key, fetch

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        received = dict(scope["headers"])
        if self.api_key and not hmac.compare_digest(received.get(b"x-api-key", b""), self.api_key.encode()):
            return await _error(send, 401, "missing or wrong X-API-Key header")
        declared = received.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(send, 413, f"body over {self.max_bytes} bytes (serve.max_body_bytes)")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _error(send, 413, f"body over {self.max_bytes} bytes (serve.max_body_bytes)")
        status, payload = await self.check(body)
        if status != 200:
            return await _error(send, status, payload)
        forwarded = json.dumps(payload).encode()
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": forwarded, "more_body": False}

        # as JSON whatever the client declared (`curl -d` says form data)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-length", str(len(forwarded)).encode()), (b"content-type", b"application/json")]
        return await self.app({**scope, "headers": headers}, replay, send)

    async def check(self, body: bytes) -> tuple[int, dict | str]:
        """(200, the normalized request) or (a 4xx status, the one-line reason)."""
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return 400, f"the body is not JSON ({getattr(e, 'msg', e)}); send one object, e.g. {self.example()}"
        if not isinstance(request, dict):
            return 400, f"send one JSON object, e.g. {self.example()}"
        if "arxiv_id" in request and self.fetch is not None:
            return await asyncio.to_thread(self.fetch, request["arxiv_id"])
        missing = [c for c in self.columns if c not in request]
        if missing:
            return 422, f"missing column(s) {', '.join(missing)}; send {self.example()}"
        wrong = [c for c in self.columns if not isinstance(request[c], str) or not request[c].strip()]
        if wrong:
            return 422, f"column(s) {', '.join(wrong)} must be non-empty strings"
        request_id = request.get("id")
        return 200, {"fields": {c: clean_text(request[c]) for c in self.columns}, "id": request_id}

    def example(self) -> str:
        return json.dumps({c: "..." for c in self.columns})


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_server(cfg: DictConfig) -> ls.LitServer:
    """The LitServer for `cfg.ckpt`: the export is checked here, before any process starts."""
    export = read_export(cfg.ckpt)
    columns = list(template_columns(export.formatting["user_template"], "data.prompt.user"))
    fetch = request_by_id(OmegaConf.to_container(cfg.arxiv, resolve=True)) if fetchable(columns) else None
    s = cfg.serve
    if s.max_batch_size < 1 or s.batch_timeout < 0:
        raise UserError(
            f"serve.max_batch_size={s.max_batch_size} and serve.batch_timeout={s.batch_timeout}: "
            "use a batch size of 1 or more and a timeout of 0 s or more."
        )
    api = ClassifierAPI(
        str(export.path),
        cfg.get("base"),
        str(cfg.paths.cache_dir),
        cfg.device,
        None if cfg.precision == "auto" else cfg.precision,
        max_batch_size=int(s.max_batch_size),
        batch_timeout=float(s.batch_timeout),
    )
    accelerator = "cuda" if pick_device(cfg.device).type == "cuda" else "cpu"
    check = {"columns": columns, "max_bytes": int(s.max_body_bytes), "api_key": s.api_key or None, "fetch": fetch}
    return ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        timeout=float(s.timeout),
        middlewares=[(RequestCheck, check)],
        track_requests=False,
    )


def check_address(host: str, port) -> None:
    """The address is free to listen on, before minutes of model loading."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in str(host) else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((str(host), int(port)))
    except (OSError, ValueError, OverflowError) as e:
        raise UserError(
            f"host={host} port={port}: cannot listen there ({getattr(e, 'strerror', None) or e}); pick a free port "
            "(port=8001) or stop what listens there, and a host of this machine (127.0.0.1, 0.0.0.0)."
        ) from None


def serve(cfg: DictConfig) -> None:
    """Run until SIGTERM or Ctrl+C; either stops taking requests, answers those in flight, then exits."""
    check_address(cfg.host, cfg.port)
    server = build_server(cfg)
    log.info("serving %s on http://%s:%d/predict (health: /health)", cfg.ckpt, cfg.host, cfg.port)
    main = os.getpid()

    def stop(signum, frame):  # LitServe shuts down gracefully on KeyboardInterrupt, in its main process only
        if os.getpid() == main:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # a forked HTTP worker: its default, quietly
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)
    server.run(host=cfg.host, port=int(cfg.port), generate_client_file=False, log_level="warning")
    log.info("stopped")
