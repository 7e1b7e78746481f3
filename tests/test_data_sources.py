"""Training data from the arXiv API (a real local server), a Hugging Face dataset, or a file: same examples.

The synthetic sample in tests/assets is served three ways; because splits are by id hash and each split is
in hash order, every source must give exactly the same examples as reading the file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from conftest import SAMPLE, api_settings, arxiv_datamodule, arxiv_spec, compose_train, run_script
from helpers.fake_arxiv import PAPERS, Paper, Reply, closed_port_url, expected, read_jsonl
from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.dataset import fetch_dataset
from lmtune.core.errors import DataError
from lmtune.data.datamodule import TextClassificationDataModule
from lmtune.training.train import train

SAMPLE_ROWS = read_jsonl(SAMPLE)
SAMPLE_PAPERS = [
    Paper(
        f"{r['id']}v1", r["title"], r["abstract"], r["primary_category"], tuple(r["categories"]), "2025-01-15T00:00:00Z"
    )
    for r in SAMPLE_ROWS
]
SAMPLE_LABELS = ["cs.CL", "cs.CV", "cs.RO"]


def datamodule(tokenizer, **kwargs) -> TextClassificationDataModule:
    options = dict(top_k=3, val_fraction=0.2, test_fraction=0.2, max_length=256, **kwargs)
    dm = arxiv_datamodule(tokenizer, **options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def examples_by_split(dm: TextClassificationDataModule) -> dict:
    return {split: [(e.id, e.input_ids, e.labels) for e in examples] for split, examples in dm.examples.items()}


def api_query(**overrides) -> dict:
    return {"categories": SAMPLE_LABELS, "max_results": 50, "page_size": 20, **overrides}


def arxiv_fetch(client: dict, **query) -> dict:
    """`data.fetch` for the arXiv source plug-in (conf/data/arxiv.yaml), against a local server."""
    return {"source": "arxiv_api", "client": client, "query": api_query(**query)}


# ------------------------------------------------------------------------------------- per-category fetch


def test_per_category_fetch_merges_parts_and_counts_cross_listed_papers(arxiv_server, tmp_path):
    arxiv_server.serve_papers(PAPERS, by_category=True)
    client = ArxivClient(**api_settings(arxiv_server.url))
    out = tmp_path / "arxiv.jsonl"
    result = fetch_dataset(client, ["cs.CL", "cs.CV"], 10, out, page_size=2)

    # cs.CL lists papers 5, 4 (cross-listed from cs.CV), 3, 1; cs.CV lists 4 again and 2
    assert read_jsonl(out) == [expected(PAPERS[i]) for i in (0, 1, 2, 4, 3)]
    assert result.count == 5 and result.duplicates_dropped == 1
    assert [q["search_query"] for q in arxiv_server.requests] == ["cat:cs.CL", "cat:cs.CL", "cat:cs.CV"]
    manifest = json.loads((tmp_path / "arxiv.manifest.json").read_text())
    assert manifest["count"] == 5 and manifest["count_per_category"] == {"cs.CL": 4, "cs.CV": 2}
    assert manifest["duplicates_dropped"] == 1
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arxiv.jsonl", "arxiv.manifest.json"]  # parts removed


def test_fetch_cli_interrupted_in_the_second_category_resumes_without_refetching(arxiv_server, tmp_path):
    arxiv_server.serve_papers(PAPERS, by_category=True)
    serve = arxiv_server.responder
    arxiv_server.responder = lambda q: Reply(503, b"busy") if "cs.CV" in q.get("search_query", "") else serve(q)
    out = tmp_path / "arxiv.jsonl"
    args = [
        "categories=[cs.CL,cs.CV]",
        "max_results=10",
        "page_size=2",
        f"out={out}",
        *(f"arxiv.{k}={v}" for k, v in api_settings(arxiv_server.url).items()),
        f"hydra.run.dir={tmp_path / 'log'}",
    ]
    first = run_script("fetch_arxiv.py", *args)
    assert first.returncode == 1 and "error: the arXiv API could not be reached" in first.stderr
    assert not out.exists()  # never a partial output file
    assert [q["search_query"] for q in arxiv_server.requests] == ["cat:cs.CL"] * 2 + ["cat:cs.CV"] * 2

    arxiv_server.responder = serve  # the API is back
    second = run_script("fetch_arxiv.py", *args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip() == f"wrote 5 records to {out}"
    assert [q["search_query"] for q in arxiv_server.requests[4:]] == ["cat:cs.CV"]  # cs.CL was complete
    assert read_jsonl(out) == [expected(PAPERS[i]) for i in (0, 1, 2, 4, 3)]
    assert json.loads((tmp_path / "arxiv.manifest.json").read_text())["count_per_category"] == {"cs.CL": 4, "cs.CV": 2}


# ------------------------------------------------------------------------------------ data.source=arxiv_api


def test_api_source_gives_the_same_examples_as_the_file_and_is_cached_per_query(arxiv_server, tiny_tokenizer, tmp_path):
    arxiv_server.serve_papers(SAMPLE_PAPERS, by_category=True)
    settings = api_settings(arxiv_server.url)
    from_file = datamodule(tiny_tokenizer, path=str(SAMPLE))

    from_api = datamodule(tiny_tokenizer, fetch=arxiv_fetch(settings), cache_dir=str(tmp_path))
    assert from_api.source.kind == "arxiv_api"  # source=auto without a path
    assert from_api.labels == SAMPLE_LABELS  # the queried categories are the label set
    assert examples_by_split(from_api) == examples_by_split(from_file)
    assert len(arxiv_server.requests) == 6  # 2 pages of 20 per category (32 papers each)

    again = datamodule(tiny_tokenizer, fetch=arxiv_fetch(settings), cache_dir=str(tmp_path))
    assert len(arxiv_server.requests) == 6  # same query: read from the cache, nothing fetched
    assert examples_by_split(again) == examples_by_split(from_file)

    datamodule(tiny_tokenizer, fetch=arxiv_fetch(settings, refresh=True), cache_dir=str(tmp_path))
    assert len(arxiv_server.requests) == 12
    datamodule(tiny_tokenizer, fetch=arxiv_fetch(settings, max_results=40), cache_dir=str(tmp_path))
    assert len(arxiv_server.requests) == 18  # another query, another cache file
    assert len(list((tmp_path / "arxiv").glob("arxiv-*.jsonl"))) == 2


def test_api_source_without_network_fails_at_once_naming_data_path(tiny_tokenizer, tmp_path):
    dm = arxiv_datamodule(tiny_tokenizer, fetch=arxiv_fetch(api_settings(closed_port_url())), cache_dir=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "could not fetch training data from the arXiv API" in message and "no network access" in message
    assert "`data.path=<records.jsonl>`" in message


def test_train_cli_offline_fails_within_seconds_before_loading_the_model(tmp_path):
    """experiment=qlora_arxiv defaults to the arXiv API; offline it must say so and name data.path=."""
    started = time.monotonic()
    proc = run_script(
        "train.py",
        "experiment=qlora_arxiv",
        "logger=none",
        f"arxiv.base_url={closed_port_url()}",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'empty-cache'}",  # no converted model: loading it would take long
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: could not fetch training data from the arXiv API" in proc.stderr
    assert "data.path=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "empty-cache" / "gguf").exists() and not list((tmp_path / "empty-cache").glob("gguf-*"))
    assert time.monotonic() - started < 60  # interpreter start-up and imports; no retries, no model


def test_training_from_the_api_end_to_end(arxiv_server, tmp_path, cache_dir):
    arxiv_server.serve_papers(SAMPLE_PAPERS, by_category=True)
    cfg = compose_train(
        [
            "experiment=smoke",
            "logger=none",
            "data.path=null",
            f"data.fetch.query.categories=[{','.join(SAMPLE_LABELS)}]",
            f"arxiv.base_url={arxiv_server.url}",
            "arxiv.min_interval=0",
            "trainer.max_steps=2",
        ],
        tmp_path,
        cache_dir,
    )
    metrics, objects = train(cfg)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["data"]["source"].startswith(str(cache_dir / "arxiv" / "arxiv-"))
    assert summary["data"]["records"] == 96 and summary["data"]["labels"] == SAMPLE_LABELS
    assert "test/acc" in metrics


# --------------------------------------------------------------------------------------------- data.source=hf


def test_hf_source_with_a_column_mapping_gives_the_same_examples_as_the_file(tiny_tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    renamed = {
        "paper_id": [r["id"] for r in SAMPLE_ROWS],
        "paper_title": [r["title"] for r in SAMPLE_ROWS],
        "summary": [r["abstract"] for r in SAMPLE_ROWS],
        "label": [r["primary_category"] for r in SAMPLE_ROWS],
    }
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(renamed)}).save_to_disk(str(tmp_path / "ds"))
    columns = {"id": "paper_id", "title": "paper_title", "abstract": "summary", "primary_category": "label"}

    from_hf = datamodule(tiny_tokenizer, source="auto", hf_name=str(tmp_path / "ds"), columns=columns)
    assert from_hf.source.kind == "hf" and from_hf.stats["source"] == f"hf:{tmp_path / 'ds'}[train]"
    assert examples_by_split(from_hf) == examples_by_split(datamodule(tiny_tokenizer, path=str(SAMPLE)))


def test_source_settings_that_cannot_work_are_named(tiny_tokenizer):
    with pytest.raises(DataError, match="data.source=file needs `data.path=`"):
        arxiv_datamodule(tiny_tokenizer, source="file")
    with pytest.raises(DataError, match="data.source=hf needs `data.hf_name=`"):
        arxiv_datamodule(tiny_tokenizer, source="hf")
    with pytest.raises(DataError, match="data.source='web': use one of auto, file, hf, arxiv_api"):
        arxiv_datamodule(tiny_tokenizer, source="web", path="x.jsonl")


def test_file_source_reads_renamed_csv_columns(tiny_tokenizer, tmp_path):
    import csv

    path = tmp_path / "papers.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arxiv", "name", "text", "cat"])
        writer.writerows([r["id"], r["title"], r["abstract"], r["primary_category"]] for r in SAMPLE_ROWS)
    columns = {"id": "arxiv", "title": "name", "abstract": "text", "primary_category": "cat"}
    from_csv = datamodule(tiny_tokenizer, path=str(path), columns=columns)
    assert examples_by_split(from_csv) == examples_by_split(datamodule(tiny_tokenizer, path=str(SAMPLE)))


def test_paths_are_not_shared_between_query_cache_files(tmp_path):
    from lmtune.data.sources import RecordSource

    spec, query = arxiv_spec(), {"categories": ["cs.CL"]}
    fetch = lambda query, client: {"source": "arxiv_api", "query": query, "client": client}  # noqa: E731
    a = RecordSource(spec, fetch=fetch(query, {"base_url": "http://a"}), cache_dir=tmp_path)
    b = RecordSource(spec, fetch=fetch(query, {"base_url": "http://b"}), cache_dir=tmp_path)
    c = RecordSource(spec, fetch=fetch({**query, "date_to": "2024-12-31"}, {}), cache_dir=tmp_path)
    assert len({a.path, b.path, c.path}) == 3 and a.path.parent == Path(tmp_path) / "arxiv"


def test_a_single_class_stops_at_start_up_naming_it(tiny_tokenizer, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({**r, "primary_category": "cs.CL"}) + "\n" for r in SAMPLE_ROWS[:20]))
    dm = arxiv_datamodule(tiny_tokenizer, path=str(path))
    with pytest.raises(DataError, match=r"one\.jsonl: 1 label after filtering: cs\.CL; need at least 2"):
        dm.load_splits()
