"""`python src/serve.py`: a real LitServe server on 127.0.0.1, asked by real HTTP clients (http.client, raw sockets,
Schemathesis). It answers like predict.py; refuses bad requests with a 4xx and a one-line JSON error (never a 500,
never a traceback in its log), each alone, however they are mixed with good ones; bounds connections, waiting
requests, slow clients and arXiv lookups; keeps every route but /health behind the key; and on SIGTERM answers the
requests in flight before it exits."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import open_dict

from conftest import ROOT, compose_train
from helpers.cli_driver import run_commands
from helpers.fake_arxiv import FakeArxiv, Paper, Reply
from helpers.server import KEY, Server
from lmtune.commands.predict import predict
from lmtune.commands.serve_requests import Refusal, parse_request
from lmtune.training.train import train

FUZZ_EXAMPLES = int(os.environ.get("LMTUNE_FUZZ_EXAMPLES", "50"))  # per operation and phase; `make fuzz`: 2,000
ROBOT = Paper(
    "2403.00010v2", "Grasping with a robot arm", "We study robot grasping.", "cs.RO", ("cs.RO",), "2024-03-01T00:00:00Z"
)
PAPERS = [ROBOT] + [
    Paper(f"2403.{i:05d}v1", f"Paper {i} on depth", "We study images.", "cs.CV", ("cs.CV",), "2024-03-01T00:00:00Z")
    for i in range(100, 112)
]


def predict_with_cli_settings(export, cache_dir, **settings) -> dict:
    """predict.py's answer for one row: its config composed for this export, `settings` as on its command line."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("predict.yaml", overrides=[f"ckpt={export}"])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache_dir)
        cfg.update(settings)
    (prediction,) = predict(cfg, emit=lambda _: None)
    return prediction


@pytest.fixture(scope="module")
def export(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("run")
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=4", "report.enabled=false"]
    train(compose_train([*overrides, "trainer.precision=32-true"], run, cache_dir))
    return run / "export"


@pytest.fixture(scope="module")
def server(export, cache_dir, tmp_path_factory):
    arxiv = FakeArxiv()
    arxiv.start()
    arxiv.serve_papers(PAPERS)
    folder = tmp_path_factory.mktemp("serve")
    settings = [f"arxiv.base_url={arxiv.url}", "arxiv.min_interval=0.2", "arxiv.backoff=0"]
    lookups = ["serve.lookup.timeout=2", "serve.lookup.max_pending=6"]
    server = Server(
        folder, f"ckpt={export}", f"paths.cache_dir={cache_dir}", "serve.max_batch_size=4", *settings, *lookups
    )
    server.arxiv = arxiv
    yield server
    server.stop()
    arxiv.stop()


def test_answers_exactly_as_predict_does(server, export, cache_dir):
    rows = [
        {"title": "Grasping with a robot arm", "abstract": "We study robot grasping control."},
        {"title": "Depth from video", "abstract": "We study   images and\ncamera depth."},
        {"title": "Parsing", "abstract": "A treebank " * 400},  # truncated to max_length
    ]
    offline = [predict_with_cli_settings(export, cache_dir, row=row) for row in rows]
    with ThreadPoolExecutor(max_workers=len(rows)) as pool:  # together: they may share a batch
        answers = list(pool.map(server.predict, rows))
    for (status, answer), expected in zip(answers, offline, strict=True):
        assert status == 200 and answer["label"] == expected.category
        assert answer["probs"] == pytest.approx(expected.probs, abs=1e-5)
        assert list(answer["probs"]) == list(expected.probs)  # most likely first, as predict.py prints them
    assert [a["truncated"] for _, a in answers] == [False, False, True]
    status, by_id = server.predict({"arxiv_id": "2403.00010"})
    paper = predict_with_cli_settings(export, cache_dir, title=ROBOT.title, abstract=ROBOT.abstract)
    assert status == 200 and by_id["probs"] == pytest.approx(paper.probs, abs=1e-5)


BAD = {  # what clients and attackers send: (body, status, part of the one-line error)
    "malformed JSON": (b'{"title": ', 400, "not JSON"),
    "not an object": (b"[1, 2]", 400, "send one JSON object"),
    "nested 10,000 deep": (b"[" * 10_000 + b"]" * 10_000, 400, "nested over 8 levels"),
    "a 5,000-digit integer": (b'{"title": "A", "abstract": "B", "id": ' + b"9" * 5000 + b"}", 400, "over 20 digits"),
    "NaN": (b'{"title": "A", "abstract": "B", "id": NaN}', 400, "NaN is not JSON"),
    "not UTF-8": (b'{"title": "caf\xe9", "abstract": "B"}', 400, "not JSON"),
    "missing column": (json.dumps({"title": "A"}).encode(), 422, "missing column(s) abstract"),
    "non-string column": (json.dumps({"title": "A", "abstract": 7}).encode(), 422, "must be non-empty strings"),
    "empty column": (json.dumps({"title": "A", "abstract": "  "}).encode(), 422, "must be non-empty strings"),
    "lone surrogate": (json.dumps({"title": "\ud800", "abstract": "B"}).encode(), 422, "title: not text"),
    "a 30 KB title": (json.dumps({"title": "x" * 30_000, "abstract": "B"}).encode(), 422, "serve.max_field_chars"),
    "a title that cannot fit": (
        json.dumps({"title": "word " * 2000, "abstract": "B"}).encode(),
        422,
        "does not fit this model's max_length",  # refused before the queue, not by the batch's fallback
    ),
    "id of a wrong type": (json.dumps({"title": "A", "abstract": "B", "id": [1]}).encode(), 422, "id must be"),
    "over-long body": (json.dumps({"title": "A", "abstract": "x" * 70_000}).encode(), 413, "serve.max_body_bytes"),
    "not an arXiv id": (json.dumps({"arxiv_id": "2403.1"}).encode(), 422, "arxiv_id: "),
    "unknown arXiv id": (json.dumps({"arxiv_id": "2403.99999"}).encode(), 404, "no paper with id 2403.99999"),
}


def assert_one_line_error(name, status, body, expected_status, text):
    assert status == expected_status and list(body) == ["error"], (name, status, body)
    assert text in body["error"] and "\n" not in body["error"], (name, body)


def test_bad_requests_get_a_4xx_with_one_line_and_never_reach_the_model(server):
    for name, (body, expected_status, text) in BAD.items():
        assert_one_line_error(name, *server.request("POST", "/predict", body), expected_status, text)
    row = {"title": "A", "abstract": "B"}
    for name, (answer, expected_status, text) in {
        "no API key": (server.predict(row, key=None), 401, "X-API-Key"),
        "wrong API key": (server.predict(row, key="guess"), 401, "X-API-Key"),
        "unknown route": (server.request("GET", "/admin"), 404, "Not Found"),
        "wrong method": (server.request("GET", "/predict"), 405, "Method Not Allowed"),
    }.items():
        assert_one_line_error(name, *answer, expected_status, text)
    assert server.predict(row)[0] == 200  # and the server still answers
    assert "Traceback" not in server.log.read_text()


def test_only_health_answers_without_the_key(server):
    for path in ("/info", "/docs", "/openapi.json"):
        assert server.request("GET", path, key=None)[0] == 401, path
        assert server.request("GET", path)[0] == 200, path
    assert server.request("GET", "/health", key=None)[0] == 200
    schema = server.request("GET", "/openapi.json")[1]
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["oneOf"][0]["required"] == ["title", "abstract"]  # the task's own columns, for clients and fuzzers


def test_bad_requests_mixed_into_good_ones_fail_alone(server, export, cache_dir):
    """100 concurrent requests, 10 of them bad: every good one gets its 200 and the label predict.py gives."""
    good = [{"title": f"Grasping {i}", "abstract": "We study robot grasping with a soft gripper."} for i in range(3)]
    good += [{"title": f"Depth {i}", "abstract": "We estimate depth from images and video."} for i in range(2)]
    offline = {row["title"]: predict_with_cli_settings(export, cache_dir, row=row).label for row in good}
    bad = [BAD[name] for name in ("lone surrogate", "a 30 KB title", "a title that cannot fit", "nested 10,000 deep")]
    work = [("bad", *bad[i // 10 % len(bad)]) if i % 10 == 3 else ("good", good[i % len(good)]) for i in range(100)]

    def send(item):
        if item[0] == "good":
            return server.predict(item[1])
        return server.request("POST", "/predict", item[1])

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, work))
    for item, (status, body) in zip(work, answers, strict=True):
        if item[0] == "good":
            assert status == 200 and body["label"] == offline[item[1]["title"]], (status, body)
        else:
            assert_one_line_error("bad", status, body, item[2], item[3])


def test_a_batch_that_still_fails_is_scored_row_by_row(export, cache_dir):
    """Rows the request check cannot foresee failing (here, one without the prompt's columns): the batch's other
    rows get their predictions, the faulty one alone its error."""
    from lmtune.commands.serve import ClassifierAPI, RowFailed
    from lmtune.evaluation.predictor import Row

    api = ClassifierAPI(str(export), None, str(cache_dir), "cpu", None, max_batch_size=4, batch_timeout=0.01)
    api.setup("cpu")
    rows = [Row({"title": "Depth", "abstract": "We study images."}), Row({"title": "only a title"})]
    rows.append(Row({"title": "Grasping", "abstract": "We study robot grasping."}))
    first, failed, last = api.predict(rows)
    assert isinstance(failed, RowFailed) and failed.status == 500
    assert [first.label, last.label] == [p.label for p in api.predictor.predict([rows[0], rows[2]])]
    response = api.encode_response(failed)
    assert response.status_code == 500 and list(json.loads(response.body)) == ["error"]


def test_arxiv_lookups_are_shared_bounded_and_never_hold_up_other_requests(server):
    arxiv, ids = server.arxiv, [p.entry_id.rsplit("v", 1)[0] for p in PAPERS[1:7]]
    # the same paper asked 8 times and 6 papers at once: answered from a few upstream requests, not 14
    asked = len(arxiv.requests)
    with ThreadPoolExecutor(max_workers=14) as pool:
        answers = list(pool.map(lambda i: server.predict({"arxiv_id": i}), [ids[0]] * 8 + ids))
    assert [status for status, _ in answers] == [200] * 14
    assert len(arxiv.requests) - asked <= 3, arxiv.requests[asked:]
    asked = len(arxiv.requests)
    assert server.predict({"arxiv_id": ids[3]})[0] == 200 and len(arxiv.requests) == asked  # cached
    # a slow arXiv: lookups give up at serve.lookup.timeout (2 s), text requests are answered meanwhile
    arxiv.queue.extend(Reply(body=b"", delay=3.0) for _ in range(2))
    with ThreadPoolExecutor(max_workers=10) as pool:
        lookups = [
            pool.submit(server.exchange, "POST", "/predict", json.dumps({"arxiv_id": p}).encode())
            for p in (
                "2403.00111",
                "2401.00001",
                "2401.00002",
                "2401.00003",
                "2401.00004",
                "2401.00005",
                "2401.00006",
                "2401.00007",
            )
        ]
        time.sleep(0.3)
        started = time.monotonic()
        assert server.predict({"title": "Depth", "abstract": "We study images."})[0] == 200
        assert time.monotonic() - started < 1.5
        statuses = sorted((f.result()[0], f.result()[2].get("retry-after")) for f in lookups)
    # 6 ids may wait (serve.lookup.max_pending): the other 2 are told to come back, the 6 time out
    assert statuses == [(503, "5")] * 2 + [(504, None)] * 6, statuses
    time.sleep(3.5)  # the slow replies end
    # arXiv failing: a 502 that names no upstream address
    arxiv.queue.extend(Reply(status=503) for _ in range(2))
    status, body = server.predict({"arxiv_id": "2401.00009"})
    assert status == 502 and "127.0.0.1" not in body["error"] and "http" not in body["error"]
    assert "127.0.0.1" in server.log.read_text()  # the operator sees where it failed


def test_fuzzing_the_api_with_schemathesis_finds_no_server_error(server, tmp_path):
    """Schemathesis generates requests from /openapi.json (valid and invalid ones) against the real server: no
    answer is a 5xx, every answer matches the schema. `positive_data_acceptance` is left out: a row within the
    schema may still not fit the model's max_length in tokens, which a JSON schema cannot say (a 422)."""
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"http://127.0.0.1:{server.port}/openapi.json",
            "--header",
            f"X-API-Key: {KEY}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(FUZZ_EXAMPLES),
            "--seed",
            "7",
            "--workers",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert server.request("GET", "/health")[0] == 200 and "Traceback" not in server.log.read_text()


@settings(max_examples=8 * FUZZ_EXAMPLES, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
            lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children),
            max_leaves=30,
        ).map(lambda value: json.dumps(value).encode()),
        st.fixed_dictionaries(
            {"title": st.text(max_size=50), "abstract": st.text(max_size=50)},
            optional={
                "id": st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=300)),
                "arxiv_id": st.text(max_size=30),
            },
        ).map(lambda value: json.dumps(value).encode()),
    )
)
def test_the_request_check_refuses_or_normalizes_any_body(body):
    """Whatever the bytes: a `Refusal` with a 4xx and one line, or fields that are non-empty encodable text."""
    try:
        request = parse_request(body, ["title", "abstract"], 1000, "{}")
    except Refusal as refusal:
        assert 400 <= refusal.status < 500 and refusal.message and "\n" not in refusal.message
        return
    if "arxiv_id" in request:
        assert isinstance(request["arxiv_id"], str)
        return
    assert set(request["fields"]) == {"title", "abstract"}
    for text in request["fields"].values():
        assert text.strip() and text.encode("utf-8") and len(text) <= 1000
    assert request["id"] is None or isinstance(request["id"], str | int)


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends on `sock` until it closes it (or `timeout` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_connections_slow_clients_and_the_queue_are_bounded(export, cache_dir, tmp_path):
    limits = ["serve.max_connections=4", "serve.header_timeout=1", "serve.body_timeout=1", "serve.max_queue=2"]
    hold = ["serve.max_batch_size=16", "serve.batch_timeout=1.5"]  # requests wait 1.5 s for a batch: a queue forms
    server = Server(tmp_path, f"ckpt={export}", f"paths.cache_dir={cache_dir}", *limits, *hold)
    try:
        # idle connections: 4 held until the header deadline (408), the rest refused at once (503)
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]
        started = time.monotonic()
        # the last is beyond the cap: answered at once, then read until it closes (a lingering close), so what its
        # client sends meanwhile is discarded instead of reset, which could destroy the 503 before it was read
        assert read_all(idle[-1], 5).startswith(b"HTTP/1.1 503")
        for _ in range(4):
            idle[-1].sendall(b"x" * 65536)
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda s: (read_all(s, 5), time.monotonic() - started), idle[:-1]))
        refused = [a for a, _ in answers if a.startswith(b"HTTP/1.1 503")]
        timed_out = [(a, t) for a, t in answers if a.startswith(b"HTTP/1.1 408")]
        assert len(refused) == 1 and len(timed_out) == 4, answers
        assert all(0.9 < t < 3 for _, t in timed_out) and b"serve.max_connections" in refused[0]
        # headers sent a byte at a time: the same deadline
        slow = socket.create_connection(("127.0.0.1", server.port))
        for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\n":
            if select.select([slow], [], [], 0.2)[0]:  # the server answered: stop sending
                break
            slow.sendall(bytes([byte]))
        assert read_all(slow, 5).startswith(b"HTTP/1.1 408")
        # a body that never finishes: 408 after serve.body_timeout
        body = socket.create_connection(("127.0.0.1", server.port))
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: 100\r\n\r\n"
        body.sendall(head.encode() + b'{"title": ')
        answer = read_all(body, 5)
        assert answer.startswith(b"HTTP/1.1 408") and b"serve.body_timeout" in answer
        for s in [*idle, slow, body]:
            s.close()
        # 6 requests at once, 2 may wait: 4 are told to retry (503 + Retry-After), the 2 are answered
        row = json.dumps({"title": "Depth", "abstract": "We study images."}).encode()
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda _: server.exchange("POST", "/predict", row), range(6)))
        statuses = sorted((status, headers.get("retry-after")) for status, _, headers in answers)
        assert statuses == [(200, None)] * 2 + [(503, "1")] * 4, answers
        assert server.request("GET", "/health")[0] == 200
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    for limit in ("serve.max_connections", "serve.header_timeout", "serve.body_timeout", "serve.max_queue"):
        assert log.count(f"({limit}: ") == 1, limit  # each limit logged once, not once per request
    assert "Traceback" not in log


def test_sigterm_answers_the_requests_in_flight_then_exits(export, cache_dir, tmp_path):
    server = Server(tmp_path, f"ckpt={export}", f"paths.cache_dir={cache_dir}", "serve.max_batch_size=2")
    rows = [{"title": f"Paper {i}", "abstract": "We study robot grasping. " * 20} for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = [pool.submit(server.predict, row) for row in rows]
        time.sleep(0.3)  # the requests are in flight
        assert server.stop() == 0
        statuses = [a.result()[0] for a in answers]
    assert statuses == [200] * 16
    assert server.request("GET", "/health")[0] == 0  # nothing listens any more
    log = server.log.read_text()
    assert "Traceback" not in log and "stopped" in log


def test_a_broken_export_or_setting_stops_before_the_server_starts(export, cache_dir, tmp_path):
    """Each case as `python src/serve.py <args>` (tests/helpers/cli_driver.py: one interpreter for all), under
    `ulimit -n 300`: one `error:` line, exit status 1, nothing started, and a key typed as a setting written nowhere."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = {
        "key as a setting": ([f"ckpt={export}", "serve.api_key=hunter2"], "serve.api_key=***: a secret is not taken"),
        "bounds of zero": (
            [f"ckpt={export}", "serve.max_batch_size=0", "serve.max_queue=0"],
            "serve.max_batch_size=0, serve.max_queue=0: use a positive number for each",
        ),
        "too few open files": (  # accept() would fail under load, with nothing logged
            [f"ckpt={export}", "serve.max_connections=256"],
            "serve.max_connections=256 needs 544 open files, but this process may open 300 (ulimit -n)",
        ),
        "not an export": ([f"ckpt={tmp_path}"], f"ckpt={tmp_path}: not a trained export (needs formatting.json"),
        "port in use": (
            [f"ckpt={export}", f"port={port}"],
            f"port={port}: cannot listen there (Address already in use)",
        ),
    }
    commands = [
        {
            "script": str(ROOT / "src" / "serve.py"),
            "args": [*args, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'h' / str(n)}"],
        }
        for n, (args, _) in enumerate(cases.values())
    ]
    files = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))  # noqa: E731
    results = run_commands(commands, tmp_path, "serve-settings", preexec_fn=files)
    busy.close()
    for (name, (_, expect)), result in zip(cases.items(), results, strict=True):
        assert result["returncode"] == 1 and "Traceback" not in result["stderr"], (name, result["stderr"][-2000:])
        lines = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and expect in lines[0], (name, lines)
        assert "hunter2" not in result["stderr"] + result["stdout"]
    written = [f.read_text() for f in (tmp_path / "h").rglob("*") if f.is_file()]
    assert not any("hunter2" in text for text in written)
