"""`python src/serve.py`: a real LitServe server on 127.0.0.1, asked by a real HTTP client. It answers like
predict.py, refuses bad requests with a 4xx and a one-line JSON error (never a 500, never a traceback in its log),
and on SIGTERM answers the requests in flight before it exits."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import ROOT, compose_train
from helpers.fake_arxiv import FakeArxiv, Paper
from lmtune.commands.predict import predict
from lmtune.training.train import train

KEY = "s3cret"
ROBOT = Paper(
    "2403.00010v2", "Grasping with a robot arm", "We study robot grasping.", "cs.RO", ("cs.RO",), "2024-03-01T00:00:00Z"
)


def predict_with_cli_settings(export, cache_dir, **settings) -> dict:
    """predict.py's answer for one row: its config composed for this export, `settings` as on its command line."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("predict.yaml", overrides=[f"ckpt={export}"])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache_dir)
        cfg.update(settings)
    (prediction,) = predict(cfg, emit=lambda _: None)
    return prediction


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`src/serve.py` in a subprocess, its log in a file."""

    def __init__(self, tmp_path, *overrides: str):
        self.port, self.log = free_port(), tmp_path / "serve.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMTUNE_API_KEY": KEY}
        cmd = [
            sys.executable,
            str(ROOT / "src" / "serve.py"),
            f"port={self.port}",
            f"hydra.run.dir={tmp_path}",
            *overrides,
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while self.request("GET", "/health")[0] != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers={"X-API-Key": key} if key else {})
            response = connection.getresponse()
            text = response.read().decode()
        except OSError:
            return 0, {}
        finally:
            connection.close()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, {"text": text}

    def predict(self, row: dict, key: str | None = KEY) -> tuple[int, dict]:
        return self.request("POST", "/predict", json.dumps(row).encode(), key)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


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
    arxiv.serve_papers([ROBOT])
    folder = tmp_path_factory.mktemp("serve")
    settings = [f"arxiv.base_url={arxiv.url}", "arxiv.min_interval=0", "arxiv.max_retries=1", "arxiv.backoff=0"]
    server = Server(folder, f"ckpt={export}", f"paths.cache_dir={cache_dir}", "serve.max_batch_size=4", *settings)
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


def test_bad_requests_get_a_4xx_with_one_line_and_never_reach_the_model(server):
    cases = {
        "malformed JSON": (server.request("POST", "/predict", b'{"title": '), 400, "not JSON"),
        "not an object": (server.request("POST", "/predict", b"[1, 2]"), 400, "send one JSON object"),
        "missing column": (server.predict({"title": "A"}), 422, "missing column(s) abstract"),
        "non-string column": (server.predict({"title": "A", "abstract": 7}), 422, "must be non-empty strings"),
        "empty column": (server.predict({"title": "A", "abstract": "  "}), 422, "must be non-empty strings"),
        "over-long body": (server.predict({"title": "A", "abstract": "x" * 70_000}), 413, "serve.max_body_bytes"),
        "no API key": (server.predict({"title": "A", "abstract": "B"}, key=None), 401, "X-API-Key"),
        "wrong API key": (server.predict({"title": "A", "abstract": "B"}, key="guess"), 401, "X-API-Key"),
        "unknown arXiv id": (server.predict({"arxiv_id": "2403.99999"}), 404, "arXiv has no paper with id 2403.99999"),
        "not an arXiv id": (server.predict({"arxiv_id": "2403.1"}), 422, "arxiv_id: "),
    }
    for name, ((status, body), expected_status, text) in cases.items():
        assert status == expected_status and list(body) == ["error"], (name, status, body)
        assert text in body["error"] and "\n" not in body["error"], (name, body)
    assert server.request("GET", "/health", key=None)[0] == 200  # health needs no key
    assert server.predict({"title": "A", "abstract": "B"})[0] == 200  # and the server still answers
    assert "Traceback" not in server.log.read_text()


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


@pytest.mark.parametrize("case", ["not an export", "port in use", "batch size zero"], ids=lambda c: c.replace(" ", "_"))
def test_a_broken_export_or_setting_stops_before_the_server_starts(case, export, cache_dir, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    settings, expect = {
        "not an export": ([f"ckpt={tmp_path}"], f"ckpt={tmp_path}: not a trained export (needs labels.json"),
        "port in use": (
            [f"ckpt={export}", f"port={busy.getsockname()[1]}"],
            f"port={busy.getsockname()[1]}: cannot listen there (Address already in use); pick a free port",
        ),
        "batch size zero": ([f"ckpt={export}", "serve.max_batch_size=0"], "serve.max_batch_size=0 and"),
    }[case]
    cmd = [sys.executable, str(ROOT / "src" / "serve.py"), *settings, f"paths.cache_dir={cache_dir}"]
    proc = subprocess.run(
        [*cmd, f"hydra.run.dir={tmp_path / 'h'}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    busy.close()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert expect in line
