"""A stand-in for export.arxiv.org: a real HTTP server on 127.0.0.1 that answers in the API's Atom format.

`FakeArxiv` answers from a queue of scripted replies first, then from a responder that pages through a
list of papers (search queries) or looks them up (`id_list`) like the real API. Shared by the client,
data-source and predict tests.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

ASSETS = Path(__file__).parents[1] / "assets" / "arxiv_atom"
SCHEME = "http://arxiv.org/schemas/atom"


# ------------------------------------------------------------------------------- Atom documents


@dataclass(frozen=True)
class Paper:
    entry_id: str  # as the feed's <id> spells it, with version
    title: str
    abstract: str
    primary: str
    categories: tuple[str, ...]
    published: str  # full timestamp, as in <published>


def entry_xml(p: Paper) -> str:
    cats = "\n".join(f'    <category term="{c}" scheme="{SCHEME}"/>' for c in p.categories)
    return f"""  <entry>
    <id>http://arxiv.org/abs/{p.entry_id}</id>
    <updated>{p.published}</updated>
    <published>{p.published}</published>
    <title>{escape(p.title)}</title>
    <summary>{escape(p.abstract)}</summary>
    <author>
      <name>Test Author</name>
    </author>
    <link href="http://arxiv.org/abs/{p.entry_id}" rel="alternate" type="text/html"/>
    <arxiv:primary_category term="{p.primary}" scheme="{SCHEME}"/>
{cats}
  </entry>"""


def feed_xml(papers: list[Paper], total: int, start: int, per_page: int) -> bytes:
    entries = "\n".join(entry_xml(p) for p in papers)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:opensearch="http://a9.com/-/spec/opensearch/1.1/" \
xmlns:arxiv="http://arxiv.org/schemas/atom">
  <id>https://arxiv.org/api/test</id>
  <title>arXiv Query</title>
  <updated>2024-03-01T00:00:00Z</updated>
  <opensearch:itemsPerPage>{per_page}</opensearch:itemsPerPage>
  <opensearch:totalResults>{total}</opensearch:totalResults>
  <opensearch:startIndex>{start}</opensearch:startIndex>
{entries}
</feed>
""".encode()


PAPERS = [
    Paper("2403.00005v1", "Fifth paper", "Abstract five.", "cs.CL", ("cs.CL",), "2024-03-05T10:00:00Z"),
    Paper("2403.00004v2", "Fourth paper", "Abstract four.", "cs.CV", ("cs.CV", "cs.CL"), "2024-03-04T10:00:00Z"),
    Paper("2403.00003v1", "Third paper", "Abstract three.", "cs.CL", ("cs.CL", "cs.AI"), "2024-03-03T10:00:00Z"),
    Paper("2403.00002v1", "Second paper", "Abstract two.", "cs.CV", ("cs.CV",), "2024-03-02T23:59:59Z"),
    Paper("2403.00001v3", "First paper", "Abstract one.", "cs.CL", ("cs.CL",), "2024-03-01T00:00:01Z"),
]


def expected(p: Paper) -> dict:
    cats = list(dict.fromkeys([p.primary, *p.categories]))
    return {
        "id": p.entry_id.rsplit("v", 1)[0],
        "title": p.title,
        "abstract": p.abstract,
        "categories": cats,
        "primary_category": p.primary,
        "published": p.published[:10],
    }


# ----------------------------------------------------------------------------------- fake server


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a slow API)
    content_length: int | None = None  # a larger value than len(body) cuts the transfer off


class FakeArxiv:
    """A scripted stand-in for export.arxiv.org: `queue` replies first, then `responder(query)`."""

    def __init__(self):
        self.queue: deque[Reply] = deque()
        self.responder: Callable[[dict], Reply] = lambda query: Reply(404, b"no route")
        self.requests: list[dict] = []  # the parsed query string of every request, in order
        self.headers: list[dict] = []
        self.arrival_clock: Callable[[], float] | None = None
        self.arrivals: list[float] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def serve_papers(self, papers: list[Paper], total: int | None = None, by_category: bool = False) -> None:
        """Answer like the real API: the slice [start, start+max_results) of `papers` for a search (only the
        papers listed in one of the query's `cat:` categories with `by_category`), and the papers whose ids
        are asked for with `id_list` (unknown ids are left out, as arXiv does)."""

        by_id = {p.entry_id.rsplit("v", 1)[0]: p for p in papers}

        def responder(query: dict) -> Reply:
            if query.get("id_list"):
                found = [by_id[i] for i in query["id_list"].split(",") if i in by_id]
                return Reply(body=feed_xml(found, len(found), 0, len(found)))
            matching = papers
            if by_category:
                wanted = set(re.findall(r"cat:([\w.-]+)", query.get("search_query", "")))
                matching = [p for p in papers if wanted & set(p.categories)]
            start, size = int(query.get("start", 0)), int(query.get("max_results", 10))
            n = len(matching) if total is None else total
            return Reply(body=feed_xml(matching[start : start + size], n, start, size))

        self.responder = responder

    def starts(self) -> list[int]:
        return [int(q["start"]) for q in self.requests]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/api/query"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}
                with fake._lock:
                    fake.requests.append(query)
                    fake.headers.append(dict(self.headers))
                    if fake.arrival_clock is not None:
                        fake.arrivals.append(fake.arrival_clock())
                    reply = fake.queue.popleft() if fake.queue else fake.responder(query)
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/atom+xml; charset=utf-8")
                    length = reply.content_length if reply.content_length is not None else len(reply.body)
                    self.send_header("Content-Length", str(length))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a handler still sleeping must not block teardown
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeTime:
    """Injected clock + sleep: sleeping advances the clock instantly and is recorded."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def closed_port_url() -> str:
    """An API URL on a local port nobody listens on: connections are refused, like a machine offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/api/query"
