"""`src/serve.py` in a subprocess on 127.0.0.1, and a plain HTTP client for it (what a user's curl does)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = "s3cret"  # the API key every test server is started with (LMTUNE_API_KEY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`src/serve.py` in a subprocess, its log in a file."""

    def __init__(self, tmp_path, *overrides: str):
        self.port, self.log = free_port(), tmp_path / "console.log"  # not serve.log: Hydra writes that one
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
        status, answer, _ = self.exchange(method, path, body, key)
        return status, answer

    def exchange(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
        """(status, JSON answer, headers)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers={"X-API-Key": key} if key else {})
            response = connection.getresponse()
            text = response.read().decode()
        except OSError as e:  # no answer: status 0, and what the client saw
            return 0, {"error": repr(e)}, {}
        finally:
            connection.close()
        headers = {k.lower(): v for k, v in response.getheaders()}
        try:
            return response.status, json.loads(text), headers
        except json.JSONDecodeError:
            return response.status, {"text": text}, headers

    def predict(self, row: dict, key: str | None = KEY) -> tuple[int, dict]:
        return self.request("POST", "/predict", json.dumps(row).encode(), key)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)
