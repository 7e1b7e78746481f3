"""The HTTP server under load: closed-loop clients on the loopback against `src/serve.py`, beside predict.py's
offline rate on the same rows in the same run.

Each concurrency level runs `clients` threads that each send `requests` rows back to back (a new request as soon
as the last is answered): requests/s, p50/p95/p99 latency, errors. A fraction of the requests (`--bad-fraction`,
10% by default) are what clients and attackers send (an unpaired surrogate, a 30 KB title, a title that cannot fit
max_length, JSON nested 10,000 deep, a 5,000-digit number): each must get its 4xx, and no good request an error;
the rate that counts is the good rows answered per second. The offline rate is `Predictor.predict` over
the same rows in this process before the server starts (what `predict.py input=<file>` runs), so both use the
machine alone. A soak at concurrency 8 samples the server's resident memory (all its processes) while it runs.

    python bench/serve_load.py --ckpt logs/train/runs/<run>/export              (the shared arXiv test split)
    python bench/serve_load.py --ckpt <export> --smoke                         (a few rows: what tests run)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, SHARED_ARXIV, emit, project_config


def rows_of(source: Path, limit: int) -> list[dict]:
    """The first `limit` test-split rows of the arXiv task (title, abstract), as a client would send them."""
    from lmtune.training.instantiate import instantiate_data

    cfg = project_config("train", ["experiment=lora_arxiv", f"data.path={source}", f"data.limit_test={limit}"])
    datamodule = instantiate_data(cfg.data)
    return [dict(r.fields) for r in datamodule.load_splits()["test"]]


def offline_rows_per_s(ckpt: str, rows: list[dict], cache_dir: str) -> float:
    import torch

    from lmtune.evaluation.predictor import Predictor, Row

    predictor = Predictor.from_export(ckpt, cache_dir, torch.device("cpu"))
    predictor.predict([Row(r) for r in rows[:4]])  # warm-up
    started = time.perf_counter()
    predictor.predict([Row(r) for r in rows])
    return len(rows) / (time.perf_counter() - started)


BAD_BODIES = [
    json.dumps({"title": "\ud800", "abstract": "We study robots."}).encode(),
    json.dumps({"title": "x" * 30_000, "abstract": "We study robots."}).encode(),
    json.dumps({"title": "word " * 2000, "abstract": "We study robots."}).encode(),
    b"[" * 10_000 + b"]" * 10_000,
    b'{"title": "A", "abstract": "B", "id": ' + b"9" * 5000 + b"}",
]


def is_bad(k: int, i: int, every: int) -> bool:
    return every > 0 and (k * 7919 + i) % every == every - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: str, cache_dir: str, work: Path, batch: int):
        self.port, work = free_port(), Path(work)
        work.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(ROOT / "src" / "serve.py"),
            f"ckpt={ckpt}",
            f"port={self.port}",
            f"paths.cache_dir={cache_dir}",
            f"serve.max_batch_size={batch}",
            f"hydra.run.dir={work}",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMTUNE_API_KEY": ""}
        self.log = work / "serve.log"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while post(self.port, "GET", "/health")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; {self.log}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        """Resident memory of the server and every process it started."""
        pids, total = _descendants(self.proc.pid) | {self.proc.pid}, 0.0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                pass
        return total

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def post(port: int, method: str, path: str, body: bytes | None = None, connection=None) -> tuple[int, float]:
    """(status, seconds); status 0 when the connection failed."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = 0
    finally:
        if own:
            connection.close()
    return status, time.perf_counter() - started


def closed_loop(port: int, rows: list[dict], clients: int, requests: int, bad_every: int = 0) -> dict:
    """`clients` threads, each sending `requests` rows one after another over its own keep-alive connection; every
    `bad_every`-th request (spread over the clients) is a bad one."""
    latencies, errors, bad, lock = [], [0], {"sent": 0, "not_4xx": 0}, threading.Lock()

    def client(k: int) -> None:
        connection, bad_sent = http.client.HTTPConnection("127.0.0.1", port, timeout=120), 0
        for i in range(requests):
            if is_bad(k, i, bad_every):  # each client goes through every kind of bad body in turn
                status, _ = post(port, "POST", "/predict", BAD_BODIES[(k + bad_sent) % len(BAD_BODIES)], connection)
                bad_sent += 1
                with lock:
                    bad["sent"] += 1
                    bad["not_4xx"] += not 400 <= status < 500
                if status == 0:
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            body = json.dumps(rows[(k * requests + i) % len(rows)]).encode()
            status, seconds = post(port, "POST", "/predict", body, connection)
            with lock:
                latencies.append(seconds)
                errors[0] += status != 200
            if status == 0:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "concurrency": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,  # good rows answered per second
        "p50_ms": 1000 * q[49],
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
        "errors": errors[0],  # good requests that did not get a 200
        "bad_requests": bad["sent"],
        "bad_not_4xx": bad["not_4xx"],  # bad requests answered otherwise than with a 4xx
    }


def soak(
    server: Server, rows: list[dict], seconds: float, clients: int = 8, warmup: float = 30.0, bad_every: int = 0
) -> dict:
    """Concurrency `clients` for `seconds` (bad requests mixed in as in `closed_loop`); the server's RSS sampled
    after a warm-up (`growth`)."""
    stop, samples = time.monotonic() + seconds, []
    counts = {"requests": 0, "errors": 0, "bad_requests": 0, "bad_not_4xx": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        connection, i, n, bad_sent = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120), 0, 0, 0
        while time.monotonic() < stop:
            n += 1
            if is_bad(k, n, bad_every):
                status, _ = post(
                    server.port, "POST", "/predict", BAD_BODIES[(k + bad_sent) % len(BAD_BODIES)], connection
                )
                bad_sent += 1
                with lock:
                    counts["bad_requests"] += 1
                    counts["bad_not_4xx"] += not 400 <= status < 500
                continue
            status, _ = post(
                server.port, "POST", "/predict", json.dumps(rows[(k + i) % len(rows)]).encode(), connection
            )
            i += clients
            with lock:
                counts["requests"] += 1
                counts["errors"] += status != 200
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    started = time.monotonic()
    while time.monotonic() < stop:
        if time.monotonic() - started >= min(warmup, seconds / 3):
            samples.append(round(server.rss_mb(), 1))
        time.sleep(max(0.5, min(10.0, seconds / 20)))
    for t in threads:
        t.join()
    return {"seconds": seconds, "concurrency": clients, **counts, "rss_mb": samples, "rss_growth": growth(samples)}


def growth(samples: list[float]) -> float | None:
    """Median RSS of the last quarter of the samples over the first quarter's, less one (a batch in flight moves a
    single sample by ~10%: medians see the trend, not the batches)."""
    if len(samples) < 4:
        return None
    quarter = len(samples) // 4
    return statistics.median(samples[-quarter:]) / statistics.median(samples[:quarter]) - 1


def bench(
    ckpt: str,
    source: Path,
    work: Path,
    limit: int,
    requests: int,
    levels,
    soak_seconds: float,
    batch: int,
    bad_fraction: float = 0.1,
):
    cache_dir = str(project_config("train", []).paths.cache_dir)
    rows = rows_of(source, limit)
    offline = offline_rows_per_s(ckpt, rows, cache_dir)
    print(f"[serve] offline (predict.py's Predictor): {offline:.2f} rows/s on {len(rows)} rows", file=sys.stderr)
    server = Server(ckpt, cache_dir, work / "serve", batch)
    try:
        post(server.port, "POST", "/predict", json.dumps(rows[0]).encode())  # warm-up
        runs, bad_every = [], round(1 / bad_fraction) if bad_fraction else 0
        for clients in levels:
            run = closed_loop(
                server.port, rows, clients, max(1, round(requests / (1 - bad_fraction)) // clients), bad_every
            )
            run["vs_offline"] = run["requests_per_s"] / offline
            runs.append(run)
            print(f"[serve] {run}", file=sys.stderr, flush=True)
        soaked = soak(server, rows, soak_seconds, bad_every=bad_every) if soak_seconds else None
        if soaked:
            print(f"[serve] soak {soaked}", file=sys.stderr, flush=True)
    finally:
        exit_code = server.stop()
    return {
        "ckpt": ckpt,
        "rows": len(rows),
        "max_batch_size": batch,
        "bad_fraction": bad_fraction,
        "offline_rows_per_s": offline,
        "levels": runs,
        "soak": soaked,
        "exit_code_after_sigterm": exit_code,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="an export (or run) folder")
    parser.add_argument("--smoke", action="store_true", help="the sample data, few requests, a short soak")
    parser.add_argument("--rows", type=int, default=128, help="test-split rows sent (and scored offline)")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad requests mixed in")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "bench" / "serve_load")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    if a.smoke:
        source = ROOT / "tests" / "assets" / "arxiv_sample.jsonl"
        result = bench(a.ckpt, source, a.work, 16, 16, (1, 8), 3.0, 4)
    else:
        result = bench(
            a.ckpt,
            SHARED_ARXIV,
            a.work,
            a.rows,
            a.requests,
            (1, 8, 32),
            a.soak_seconds,
            a.max_batch_size,
            a.bad_fraction,
        )
    return emit(result, a.out)


if __name__ == "__main__":
    main()
