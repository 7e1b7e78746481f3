"""`serve(cfg)`: a trained export over HTTP on LitServe: `POST /predict` with one row of the task's columns (or,
for an arXiv model, `{"arxiv_id": ...}`) answers `{"label", "probs"}` exactly as `predict.py` does: the same
`Predictor` (the export's formatting, rank scoring over the label set), with requests batched dynamically.

Safe to expose (docs/serving.md, "Running it in public"): every request is checked whole before it is queued
(`serve_requests.RequestCheck`), and a batch that still fails is scored again row by row, so that only the row at
fault gets an error; connections, waiting requests, the time to send a request and arXiv lookups are bounded
(`serve_limits`); the API key comes from the environment only (`LMTUNE_API_KEY`) and guards every route but
/health.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import litserve as ls
from fastapi.responses import JSONResponse
from omegaconf import DictConfig, OmegaConf

from lmtune.artifacts.export import load_formatter, read_export
from lmtune.arxiv.lookup import fetchable
from lmtune.commands.serve_chat import ChatAPI, ChatCheck, chat_openapi_schema
from lmtune.commands.serve_limits import LimitLog, ServeLimits, guarded_protocol
from lmtune.commands.serve_requests import MAX_ID_CHARS, RequestCheck, RowCheck, api_document
from lmtune.core.errors import DataError, UserError, first_line
from lmtune.data.formatting import template_columns
from lmtune.evaluation.predictor import Prediction, Predictor, Row, pick_device
from lmtune.model.calibration import checked_threshold

log = logging.getLogger(__name__)

API_KEY_VARIABLE = "LMTUNE_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# what /openapi.json says an arxiv_id looks like: 2401.01234 (or 0704.0001), math/0301234, with a version or not
ARXIV_ID_PATTERN = r"^(\d\d(0[1-9]|1[0-2])\.\d{4,5}|[a-z-]+(\.[A-Z]{2})?/\d\d(0[1-9]|1[0-2])\d{3})(v[1-9]\d{0,2})?$"


class RowFailed:
    """A row of a batch that could not be scored on its own either; answered with its own error."""

    def __init__(self, error: BaseException):
        self.status = 422 if isinstance(error, DataError) else 500
        self.message = first_line(error, 300)


class ClassifierAPI(ls.LitAPI):
    """The model side: rows in, predictions out, a batch at a time (in LitServe's inference worker process)."""

    def __init__(
        self,
        ckpt: str,
        base: str | None,
        cache_dir: str,
        device: str,
        precision: str | None,
        trust: dict | None = None,
        **batching,
    ):
        super().__init__(**batching)
        self.ckpt, self.base, self.cache_dir = ckpt, base, cache_dir
        self.device_name, self.precision = device, precision
        self.trust = trust or {}  # coverage (label sets), min_confidence (abstention)

    def setup(self, device) -> None:  # LitServe's device name; ours follows `device=` as predict.py does
        self.limit_log = LimitLog()  # here, in the worker: the API object is pickled to start it
        options = {"precision": self.precision} if self.precision else {}
        device = pick_device(self.device_name)
        self.predictor = Predictor.from_export(self.ckpt, self.cache_dir, device, base=self.base, **options)

    def decode_request(self, request: dict) -> Row:
        return Row(request["fields"], request.get("id"))  # checked and normalized by RequestCheck

    def batch(self, rows: list[Row]) -> list[Row]:
        return list(rows)

    def predict(self, rows) -> list[Prediction | RowFailed]:
        rows = rows if isinstance(rows, list) else [rows]
        try:
            return self.predictor.predict(rows, **self.trust)
        except Exception as e:  # a row the request check could not foresee: each row on its own, so only it fails
            first = e
        answers = []
        for row in rows:
            try:
                answers.extend(self.predictor.predict([row], **self.trust))
            except Exception as e:
                answers.append(RowFailed(e))
        failed = [a for a in answers if isinstance(a, RowFailed)]
        self.limit_log.hit(
            "batch scored row by row",
            f"a batch of {len(rows)} raised {type(first).__name__}: {RowFailed(first).message}; scored row by row, "
            f"{len(failed)} row(s) failed on their own",
        )
        return answers

    def unbatch(self, predictions: list) -> list:
        return predictions

    def encode_response(self, prediction):
        if isinstance(prediction, list):  # without batching, predict answered a list of one
            (prediction,) = prediction
        if isinstance(prediction, RowFailed):
            return JSONResponse({"error": prediction.message}, status_code=prediction.status)
        answer = {"label": prediction.label, "probs": prediction.probs, "truncated": prediction.truncated}
        if prediction.label_set is not None:
            answer["label_set"] = prediction.label_set
        return answer


def openapi_schema(columns: list[str], limits: ServeLimits, by_id: bool) -> dict:
    """The API as clients (and Schemathesis) read it from /openapi.json."""
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_field_chars, "pattern": r"\S"}
    integer = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
    row_id = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}, integer, {"type": "null"}]}
    row = {"type": "object", "required": columns, "properties": {**dict.fromkeys(columns, text), "id": row_id}}
    body = row
    if by_id:  # the usual spellings; abs/pdf URLs and `arXiv:` prefixes are accepted too
        paper_id = {"type": "string", "pattern": ARXIV_ID_PATTERN}
        paper = {"type": "object", "required": ["arxiv_id"], "properties": {"arxiv_id": paper_id, "id": row_id}}
        row = {**row, "not": {"required": ["arxiv_id"]}}  # a body with an arxiv_id is looked up
        body = {"oneOf": [row, paper]}
    error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    answer = {
        "type": "object",
        "required": ["label", "probs", "truncated"],
        "properties": {
            "label": {"type": "string", "description": 'a label, or "abstain" under min_confidence'},
            "probs": {"type": "object", "additionalProperties": {"type": "number"}},
            "truncated": {"type": "boolean"},
            "label_set": {"type": "array", "items": {"type": "string"}, "description": "with coverage set"},
        },
    }
    errors = {
        "400": "not JSON, or not one flat object",
        "401": "missing or wrong X-API-Key",
        "404": "no such arXiv paper",
        "408": "the request took too long to arrive",
        "413": "the body is too long",
        "422": "a column is missing, empty, not text, too long, or does not fit the model",
        "502": "the arXiv API did not answer",
        "503": "busy: too many requests or lookups waiting (Retry-After)",
        "504": "the model or arXiv did not answer in time",
    }
    json_of = lambda schema: {"application/json": {"schema": schema}}  # noqa: E731
    responses = {"200": {"description": "the label and every label's probability", "content": json_of(answer)}}
    responses |= {code: {"description": what, "content": json_of(error)} for code, what in errors.items()}
    key = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    return api_document("lmtune classifier", key, "/predict", "the label of one row", body, responses)


def build_server(cfg: DictConfig) -> tuple[ls.LitServer, dict]:
    """The LitServer for `cfg.ckpt` and the uvicorn settings it runs with: the export and every setting are
    checked here, before any process starts."""
    export = read_export(cfg.ckpt)
    limits = ServeLimits.of(OmegaConf.to_container(cfg.serve, resolve=True))
    limits.check_open_files()
    api_key = os.environ.get(API_KEY_VARIABLE) or None
    if api_key is None and str(cfg.host) not in LOOPBACK:
        log.warning(
            "serving on %s without %s: anyone who reaches this port can use the model; set %s=<key>",
            cfg.host,
            API_KEY_VARIABLE,
            API_KEY_VARIABLE,
        )
    model = (str(export.path), cfg.get("base"), str(cfg.paths.cache_dir), cfg.device)
    precision = None if cfg.precision == "auto" else cfg.precision
    limit_log = LimitLog()
    if export.kind == "generate":
        api, schema = ChatAPI(*model, precision), chat_openapi_schema(limits)
        checker = lambda: ChatCheck(load_formatter(export), limits)  # noqa: E731
    else:
        columns = list(template_columns(export.formatting["user_template"], "data.prompt.user"))
        lookup = OmegaConf.to_container(cfg.arxiv, resolve=True) if fetchable(columns) else None
        if lookup is not None:  # a server waits at most serve.lookup.timeout: no long retries behind it
            lookup |= {"timeout": min(float(lookup["timeout"]), limits.lookup_timeout), "max_retries": 2}
        batching = {"max_batch_size": limits.max_batch_size, "batch_timeout": float(limits.batch_timeout)}
        trust = {"coverage": cfg.get("coverage"), "min_confidence": cfg.get("min_confidence")}
        checked_threshold(export.calibration, trust["coverage"], trust["min_confidence"], str(export.path))
        api = ClassifierAPI(*model, precision, trust=trust, **batching)
        schema = openapi_schema(columns, limits, lookup is not None)
        checker = lambda: RowCheck(load_formatter(export), limits, lookup, limit_log)  # noqa: E731
    accelerator = "cuda" if pick_device(cfg.device).type == "cuda" else "cpu"
    check = {"checker_factory": checker, "limits": limits, "api_key": api_key, "limit_log": limit_log}
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        timeout=float(limits.timeout),
        middlewares=[(RequestCheck, check)],
        track_requests=False,
    )
    server.app.openapi = lambda: schema  # FastAPI's own would describe the routes as taking anything
    uvicorn = {"http": guarded_protocol(limits, limit_log), "timeout_keep_alive": limits.keep_alive}
    return server, uvicorn


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
    server, uvicorn = build_server(cfg)
    route = "/v1/chat/completions" if read_export(cfg.ckpt).kind == "generate" else "/predict"
    log.info("serving %s on http://%s:%d%s (health: /health)", cfg.ckpt, cfg.host, cfg.port, route)
    main = os.getpid()

    def stop(signum, frame):  # LitServe shuts down gracefully on KeyboardInterrupt, in its main process only
        if os.getpid() == main:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # a forked HTTP worker: its default, quietly
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)
    server.run(host=cfg.host, port=int(cfg.port), generate_client_file=False, log_level="warning", **uvicorn)
    log.info("stopped")
