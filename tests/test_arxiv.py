"""The arXiv API client against a real local HTTP server that speaks the API's Atom format.

Nothing here touches the network: `FakeArxiv` is a ThreadingHTTPServer on 127.0.0.1 whose answers are
scripted per test (a queue of replies, else a responder that pages through a list of papers like the
real API). Waiting is done through an injected fake clock/sleep, except in the one real-timeout test.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from helpers.fake_arxiv import (
    ASSETS,
    PAPERS,
    FakeTime,
    Paper,
    Reply,
    closed_port_url,
    expected,
    feed_xml,
    read_jsonl,
)
from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.feed import ArxivApiError, parse_feed
from lmtune.arxiv.fetch import FetchPaths, fetch_records
from lmtune.arxiv.ids import normalize_id
from lmtune.arxiv.lookup import fetch_by_ids
from lmtune.arxiv.query import search_query


@pytest.fixture
def server(arxiv_server):
    """The shared local arXiv server (conftest), under the short name these tests use."""
    return arxiv_server


@pytest.fixture
def fake_time():
    return FakeTime()


@pytest.fixture
def make_client(server, fake_time):
    """A client for the fake server; no rate-limit spacing unless a test asks for it."""

    def make(**kwargs) -> ArxivClient:
        options = dict(
            base_url=server.url,
            min_interval=0.0,
            timeout=2.0,
            max_retries=3,
            backoff=2.0,
            sleep=fake_time.sleep,
            clock=fake_time.clock,
        )
        options.update(kwargs)
        return ArxivClient(**options)

    return make


# ------------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "text, expected_id",
    [
        ("2401.01234", "2401.01234"),
        ("2401.01234v2", "2401.01234"),
        ("arXiv:2401.01234", "2401.01234"),
        ("ARXIV:2401.01234v11", "2401.01234"),
        ("https://arxiv.org/abs/2401.01234v3", "2401.01234"),
        ("http://arxiv.org/abs/2401.01234v2", "2401.01234"),
        ("http://arxiv.org/pdf/2401.01234v1", "2401.01234"),
        ("http://arxiv.org/pdf/2401.01234v1.pdf", "2401.01234"),
        ("  0704.0001 ", "0704.0001"),
        ("math/0301234", "math/0301234"),
        ("math.GT/0301234v1", "math/0301234"),
        ("hep-th/9901001v2", "hep-th/9901001"),
        ("http://arxiv.org/abs/cond-mat/0102536v1", "cond-mat/0102536"),
    ],
)
def test_normalize_id_accepts(text, expected_id):
    assert normalize_id(text) == expected_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1234",
        "2401.123",
        "2401.123456",
        "2413.01234",
        "2401.01234v",
        "2401-01234",
        "math/030123",
        "https://example.com/abs/2401.01234",
        "abs/2401.01234",
        "arXiv:",
        "math/0301234/extra",
    ],
)
def test_normalize_id_rejects(text):
    with pytest.raises(ValueError, match="not an arXiv id"):
        normalize_id(text)


def test_normalize_id_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a string"):
        normalize_id(2401.01234)


# --------------------------------------------------------------------------------------- queries


def test_search_query_forms():
    assert search_query(["cs.CL"]) == "cat:cs.CL"
    assert (
        search_query(["cs.CL", "cs.CV"], "2024-01-01", "2024-12-31")
        == "(cat:cs.CL OR cat:cs.CV) AND submittedDate:[202401010000 TO 202412312359]"
    )
    open_end = search_query("hep-th", date_from="2020-02-29")
    assert open_end == "cat:hep-th AND submittedDate:[202002290000 TO 209912312359]"
    with pytest.raises(ValueError, match="at least one category"):
        search_query([])
    with pytest.raises(ValueError, match="not arXiv category names"):
        search_query(['cs.CL" OR all:x'])
    with pytest.raises(ValueError, match="after date_to"):
        search_query(["cs.CL"], "2024-02-01", "2024-01-01")


# --------------------------------------------------------------------------------------- parsing


def test_parse_feed_multi_category_latex_and_old_ids():
    page = parse_feed((ASSETS / "multi_category_latex.xml").read_bytes())
    assert (page.total_results, page.start_index, page.items_per_page, page.skipped) == (2, 0, 100, 0)
    assert [e.to_dict() for e in page.entries] == [
        {
            "id": "2402.05678",
            "title": r"Heavy Tails in Gradient Noise: $\alpha$-stable Limits for SGD",
            "abstract": r"We show that the gradient noise of SGD is well described by $\alpha$-stable laws with "
            r"$1 < \alpha \leq 2$, rather than Gaussians. Our bounds hold for $\mathcal{O}(n^{-1/2})$ step "
            r"sizes & all batch sizes.",
            "categories": ["stat.ML", "cs.LG", "math.PR"],  # primary first, then feed order, no repeats
            "primary_category": "stat.ML",
            "published": "2024-02-08",
        },
        {
            "id": "math/0301234",
            "title": "Knot Floer homology of small Seifert fibred spaces",
            "abstract": r"We compute $\widehat{HFK}$ for a family of knots.",
            "categories": ["math.GT", "math.SG"],
            "primary_category": "math.GT",
            "published": "2003-01-21",
        },
    ]


def test_parse_feed_error_entry_and_broken_bodies():
    with pytest.raises(ArxivApiError, match="incorrect id format for 1234.12345") as err:
        parse_feed((ASSETS / "error_bad_id.xml").read_bytes())
    assert not err.value.retryable
    good = (ASSETS / "multi_category_latex.xml").read_bytes()
    with pytest.raises(ArxivApiError, match="not well-formed XML") as err:
        parse_feed(good[: len(good) // 2])
    assert err.value.retryable
    with pytest.raises(ArxivApiError, match="not an Atom feed") as err:
        parse_feed(b"<html><body>Service Unavailable</body></html>")
    assert err.value.retryable


def test_parse_feed_skips_unusable_entry(caplog):
    bad = Paper("not-an-id", "T", "A", "cs.CL", ("cs.CL",), "2024-01-01T00:00:00Z")
    page = parse_feed(feed_xml([bad, PAPERS[0]], 2, 0, 2))
    assert [e.id for e in page.entries] == ["2403.00005"]
    assert page.skipped == 1
    assert "skipping unusable arXiv entry" in caplog.text


# -------------------------------------------------------------------------------------- fetching


def test_fetch_multi_page_exact_output_and_manifest(server, make_client, tmp_path):
    server.serve_papers(PAPERS)
    client = make_client()
    out = tmp_path / "data" / "arxiv.jsonl"

    result = fetch_records(
        client, ["cs.CL", "cs.CV"], 10, out, page_size=2, date_from="2024-01-01", date_to="2024-12-31"
    )

    assert (result.path, result.count, result.duplicates_dropped, result.pages) == (out, 5, 0, 3)
    assert server.starts() == [0, 2, 4]  # start=6 >= totalResults: not requested
    query = "(cat:cs.CL OR cat:cs.CV) AND submittedDate:[202401010000 TO 202412312359]"
    assert server.requests[0] == {
        "search_query": query,
        "sortBy": "submittedDate",
        "sortOrder": "descending",
        "start": "0",
        "max_results": "2",
    }
    assert all(h["User-Agent"].startswith("lmtune/0.1") for h in server.headers)
    assert read_jsonl(out) == [
        {
            "id": "2403.00005",
            "title": "Fifth paper",
            "abstract": "Abstract five.",
            "categories": ["cs.CL"],
            "primary_category": "cs.CL",
            "published": "2024-03-05",
        },
        {
            "id": "2403.00004",
            "title": "Fourth paper",
            "abstract": "Abstract four.",
            "categories": ["cs.CV", "cs.CL"],
            "primary_category": "cs.CV",
            "published": "2024-03-04",
        },
        {
            "id": "2403.00003",
            "title": "Third paper",
            "abstract": "Abstract three.",
            "categories": ["cs.CL", "cs.AI"],
            "primary_category": "cs.CL",
            "published": "2024-03-03",
        },
        {
            "id": "2403.00002",
            "title": "Second paper",
            "abstract": "Abstract two.",
            "categories": ["cs.CV"],
            "primary_category": "cs.CV",
            "published": "2024-03-02",
        },
        {
            "id": "2403.00001",
            "title": "First paper",
            "abstract": "Abstract one.",
            "categories": ["cs.CL"],
            "primary_category": "cs.CL",
            "published": "2024-03-01",
        },
    ]
    manifest = json.loads((tmp_path / "data" / "arxiv.manifest.json").read_text())
    fetched_at = manifest.pop("fetched_at")
    assert fetched_at.endswith("+00:00") and fetched_at[:2] == "20"
    assert manifest == {
        "query": query,
        "categories": ["cs.CL", "cs.CV"],
        "date_from": "2024-01-01",
        "date_to": "2024-12-31",
        "max_results": 10,
        "page_size": 2,
        "base_url": server.url,
        "count": 5,
        "duplicates_dropped": 0,
        "skipped_unusable": 0,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    paths = FetchPaths.for_output(out)
    assert not paths.partial.exists() and not paths.state.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["arxiv.jsonl", "arxiv.manifest.json"]  # no temp files


def test_fetch_stops_at_max_results_and_logs_progress_per_page(server, make_client, tmp_path, caplog):
    server.serve_papers(PAPERS)
    with caplog.at_level("INFO", logger="lmtune.core.progress"):
        result = fetch_records(make_client(), ["cs.CL"], 3, tmp_path / "a.jsonl", page_size=2)
    assert (result.count, result.pages) == (3, 2)
    # stderr is not a terminal under pytest: a log line per page with the count, the rate and the time left
    lines = [r.getMessage() for r in caplog.records if r.name == "lmtune.core.progress"]
    assert [line.split(",")[0] for line in lines] == [
        "fetching from arXiv: 2/3 records (66%)",
        "fetching from arXiv: 3/3 records (100%)",
    ]
    assert all("records/s" in line and "left" in line for line in lines)
    assert server.starts() == [0, 2]
    assert read_jsonl(tmp_path / "a.jsonl") == [expected(p) for p in PAPERS[:3]]


def test_fetch_multi_category_latex_entry_end_to_end(server, make_client, tmp_path):
    server.queue.append(Reply(body=(ASSETS / "multi_category_latex.xml").read_bytes()))
    result = fetch_records(make_client(), ["stat.ML", "math.GT"], 100, tmp_path / "a.jsonl")
    records = read_jsonl(tmp_path / "a.jsonl")
    assert result.count == 2
    assert records[0]["categories"] == ["stat.ML", "cs.LG", "math.PR"]
    assert records[0]["title"] == r"Heavy Tails in Gradient Noise: $\alpha$-stable Limits for SGD"
    assert records[0]["abstract"].startswith(r"We show that the gradient noise of SGD is well described by $\alpha$")
    assert "\n" not in records[0]["abstract"] and "  " not in records[0]["abstract"]
    assert records[1]["id"] == "math/0301234"


def test_fetch_empty_result(server, make_client, tmp_path):
    server.queue.append(Reply(body=(ASSETS / "empty.xml").read_bytes()))
    out = tmp_path / "empty.jsonl"
    result = fetch_records(make_client(), ["cs.CL"], 100, out, date_from="1990-01-01", date_to="1990-01-01")
    assert (result.count, result.pages, result.duplicates_dropped) == (0, 1, 0)
    assert out.read_bytes() == b""
    manifest = json.loads((tmp_path / "empty.manifest.json").read_text())
    assert manifest["count"] == 0
    assert manifest["sha256"] == hashlib.sha256(b"").hexdigest()


def test_duplicate_id_across_pages_is_dropped_and_counted(server, make_client, tmp_path):
    # The listing shifted between requests (a new version was announced): 2403.00004 shows up on both pages.
    page1 = [PAPERS[0], PAPERS[1]]
    page2 = [Paper("2403.00004v3", "Fourth paper v3", "Newer.", "cs.CV", ("cs.CV",), "2024-03-04T10:00:00Z"), PAPERS[2]]
    server.queue.extend([Reply(body=feed_xml(page1, 4, 0, 2)), Reply(body=feed_xml(page2, 4, 2, 2))])
    out = tmp_path / "a.jsonl"
    result = fetch_records(make_client(), ["cs.CL"], 10, out, page_size=2)
    assert (result.count, result.duplicates_dropped, result.pages) == (3, 1, 2)
    assert read_jsonl(out) == [expected(PAPERS[0]), expected(PAPERS[1]), expected(PAPERS[2])]
    assert json.loads((tmp_path / "a.manifest.json").read_text())["duplicates_dropped"] == 1


# --------------------------------------------------------------------------------------- retries


def test_503_then_success_retries_with_backoff(server, make_client, fake_time, caplog):
    server.serve_papers(PAPERS)
    server.queue.extend([Reply(503, b"busy"), Reply(503, b"busy")])
    client = make_client(max_retries=5, backoff=2.0)
    with caplog.at_level(logging.WARNING, logger="lmtune.arxiv.client"):
        page = client.get({"search_query": "cat:cs.CL", "start": 0, "max_results": 2})
    assert [e.id for e in page.entries] == ["2403.00005", "2403.00004"]
    assert client.requests_made == 3 == len(server.requests)
    assert fake_time.sleeps == [2.0, 4.0]  # backoff * 2**attempt
    assert "HTTP 503" in caplog.text and "retrying in 2.0 s" in caplog.text


@pytest.mark.parametrize(
    "reply, sleeps",
    [(Reply(503, b"busy"), [2.0]), (Reply(429, b"slow down", headers={"Retry-After": "7"}), [7.0])],
    ids=["503_then_success", "429_honours_retry_after"],
)
def test_one_transient_answer_then_success(server, make_client, fake_time, reply, sleeps):
    server.serve_papers(PAPERS)
    server.queue.append(reply)
    client = make_client()
    client.get({"search_query": "cat:cs.CL", "start": 0, "max_results": 2})
    assert client.requests_made == 2
    assert fake_time.sleeps == sleeps


def test_slow_response_past_timeout_is_retried(server, make_client, fake_time):
    server.serve_papers(PAPERS)
    server.queue.append(Reply(body=feed_xml(PAPERS[:2], 5, 0, 2), delay=1.0))
    client = make_client(timeout=0.3)  # the server answers after 1.0 s: the client must give up and retry
    page = client.get({"search_query": "cat:cs.CL", "start": 0, "max_results": 2})
    assert len(page.entries) == 2
    assert client.requests_made == 2 == len(server.requests)
    assert fake_time.sleeps == [2.0]


@pytest.mark.parametrize("cut", ["short body", "connection closed mid-body"])
def test_truncated_body_then_good_one_is_retried(server, make_client, cut):
    good = feed_xml(PAPERS[:2], 5, 0, 2)
    half = good[: len(good) // 2]
    server.queue.append(Reply(body=half, content_length=len(good) if cut == "connection closed mid-body" else None))
    server.queue.append(Reply(body=good))
    client = make_client()
    page = client.get({"search_query": "cat:cs.CL", "start": 0, "max_results": 2})
    assert [e.id for e in page.entries] == ["2403.00005", "2403.00004"]
    assert client.requests_made == 2


def test_truncated_forever_gives_up_after_max_retries(server, make_client, fake_time):
    good = feed_xml(PAPERS[:2], 5, 0, 2)
    server.responder = lambda query: Reply(body=good[:-40])
    client = make_client(max_retries=4, backoff=0.5)
    with pytest.raises(ArxivApiError, match="could not be reached or did not answer properly after 4 attempts"):
        client.get({"search_query": "cat:cs.CL", "start": 0, "max_results": 2})
    assert client.requests_made == 4 == len(server.requests)
    assert fake_time.sleeps == [0.5, 1.0, 2.0]  # no sleep after the last attempt


def test_unreachable_server_on_the_first_request_is_reported_at_once(make_client, fake_time):
    client = make_client(base_url=closed_port_url(), max_retries=5)
    with pytest.raises(ArxivApiError, match="cannot reach the arXiv API at 127.0.0.1:.*no network access"):
        client.get({"id_list": "2401.01234"})
    assert client.requests_made == 1 and fake_time.sleeps == []  # no backoff: offline is not transient


def test_connection_refused_after_an_answer_is_retried_then_reported(server, make_client):
    server.serve_papers(PAPERS)
    client = make_client(max_retries=2)
    client.get({"id_list": "2403.00001"})
    client.base_url = closed_port_url()  # the server went away mid-run
    with pytest.raises(ArxivApiError, match="after 2 attempts"):
        client.get({"id_list": "2401.01234"})
    assert client.requests_made == 3


def test_fetch_by_ids_accepts_any_spelling_and_leaves_out_unknown_ids(server, make_client):
    server.serve_papers(PAPERS)
    client = make_client()
    found = fetch_by_ids(
        client, ["2403.00004v2", "https://arxiv.org/abs/2403.00001v3", "arXiv:2403.00004", "2403.09999"], chunk_size=2
    )
    assert {k: v.to_dict() for k, v in found.items()} == {
        "2403.00004": expected(PAPERS[1]),
        "2403.00001": expected(PAPERS[4]),
    }
    assert [q["id_list"] for q in server.requests] == ["2403.00004,2403.00001", "2403.09999"]
    with pytest.raises(ValueError, match="not an arXiv id"):
        fetch_by_ids(client, ["2403.123"])
    assert len(server.requests) == 2  # a malformed id fails before any request


@pytest.mark.parametrize("status", [200, 400])
def test_error_entry_raises_the_api_message_without_retrying(server, make_client, fake_time, status):
    body = (ASSETS / "error_bad_id.xml").read_bytes()
    server.responder = lambda query: Reply(status, body) if query.get("id_list") == "1234.12345" else Reply(404)
    client = make_client()
    with pytest.raises(ArxivApiError, match="arXiv API error: incorrect id format for 1234.12345"):
        client.get({"id_list": "1234.12345"})
    assert client.requests_made == 1
    assert fake_time.sleeps == []


def test_http_404_is_not_retried(server, make_client):
    client = make_client()
    with pytest.raises(ArxivApiError, match="HTTP 404"):
        client.get({"search_query": "cat:cs.CL"})
    assert client.requests_made == 1


# ---------------------------------------------------------------------------------- rate limiting


def test_requests_are_spaced_by_min_interval(server, make_client, fake_time):
    server.serve_papers(PAPERS)
    server.arrival_clock = fake_time.clock
    client = make_client(min_interval=3.0)
    params = {"search_query": "cat:cs.CL", "start": 0, "max_results": 2}
    client.get(params)
    client.get(params)
    fake_time.now += 2.0  # time spent elsewhere counts toward the interval
    client.get(params)
    client.get(params)
    assert fake_time.sleeps == [3.0, 1.0, 3.0]
    assert [t - server.arrivals[0] for t in server.arrivals] == [0.0, 3.0, 6.0, 9.0]


def test_retry_after_backoff_still_respects_min_interval(server, make_client, fake_time):
    server.serve_papers(PAPERS)
    server.arrival_clock = fake_time.clock
    server.queue.append(Reply(503, b"busy"))
    client = make_client(min_interval=3.0, backoff=2.0)
    client.get({"search_query": "cat:cs.CL", "start": 0, "max_results": 2})
    assert fake_time.sleeps == [2.0, 1.0]  # backoff, then the rest of the 3 s interval
    assert server.arrivals[1] - server.arrivals[0] == 3.0


# ---------------------------------------------------------------------------------------- resuming


def test_interrupted_fetch_resumes_without_refetching(server, make_client, tmp_path):
    sixth = Paper("2402.09999v1", "Sixth paper", "Abstract six.", "cs.AI", ("cs.AI",), "2024-02-29T08:00:00Z")
    papers = [*PAPERS, sixth]
    server.serve_papers(papers)
    pager = server.responder  # the working API, to switch back to for the rerun
    server.responder = lambda query: Reply(503, b"down") if query["start"] == "4" else pager(query)
    out = tmp_path / "arxiv.jsonl"
    paths = FetchPaths.for_output(out)

    with pytest.raises(ArxivApiError, match="after 2 attempts"):
        fetch_records(make_client(max_retries=2), ["cs.CL"], 100, out, page_size=2)
    assert server.starts() == [0, 2, 4, 4]
    state = json.loads(paths.state.read_text())
    assert state["next_start"] == 4 and state["count"] == 4
    assert [r["id"] for r in read_jsonl(paths.partial)] == ["2403.00005", "2403.00004", "2403.00003", "2403.00002"]
    assert not out.exists()

    server.requests.clear()
    server.responder = pager
    result = fetch_records(make_client(), ["cs.CL"], 100, out, page_size=2)
    assert server.starts() == [4]  # pages 1-2 were not requested again
    assert (result.count, result.pages, result.resumed_from, result.duplicates_dropped) == (6, 1, 4, 0)
    assert read_jsonl(out) == [expected(p) for p in papers]
    assert not paths.partial.exists() and not paths.state.exists()
    assert json.loads(paths.manifest.read_text())["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_progress_of_a_different_query_is_not_reused(server, make_client, tmp_path):
    server.serve_papers(PAPERS)
    server.queue.extend([Reply(body=feed_xml(PAPERS[:2], 5, 0, 2))] + [Reply(503, b"down")] * 2)
    out = tmp_path / "arxiv.jsonl"
    with pytest.raises(ArxivApiError):
        fetch_records(make_client(max_retries=2), ["cs.CL"], 100, out, page_size=2)
    assert json.loads(FetchPaths.for_output(out).state.read_text())["next_start"] == 2

    server.requests.clear()
    result = fetch_records(make_client(), ["cs.CV"], 100, out, page_size=2)
    assert server.starts() == [0, 2, 4]  # started over
    assert "cat:cs.CV" in server.requests[0]["search_query"]
    assert (result.count, result.resumed_from) == (5, 0)
    assert read_jsonl(out) == [expected(p) for p in PAPERS]


def test_resume_drops_a_page_appended_but_not_recorded_in_the_state(server, make_client, tmp_path):
    """A crash between appending a page and saving the state must not duplicate that page."""
    server.serve_papers(PAPERS)
    server.queue.extend([Reply(body=feed_xml(PAPERS[:2], 5, 0, 2))] + [Reply(503, b"down")] * 2)
    out = tmp_path / "arxiv.jsonl"
    paths = FetchPaths.for_output(out)
    with pytest.raises(ArxivApiError):
        fetch_records(make_client(max_retries=2), ["cs.CL"], 100, out, page_size=2)
    with paths.partial.open("a", encoding="utf-8") as f:  # page 2 written, state not yet saved, then a cut line
        f.write(json.dumps(expected(PAPERS[2])) + "\n" + json.dumps(expected(PAPERS[3])) + "\n" + '{"id": "24')

    server.requests.clear()
    result = fetch_records(make_client(), ["cs.CL"], 100, out, page_size=2)
    assert server.starts() == [2, 4]
    assert (result.count, result.duplicates_dropped) == (5, 0)
    assert read_jsonl(out) == [expected(p) for p in PAPERS]
