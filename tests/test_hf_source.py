"""The Hugging Face `datasets` source, on real datasets written by `datasets` itself, fully offline.

Every test runs with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and the Hugging Face caches in tmp_path, so
nothing reaches the network or the user's home. `datasets` reads these variables once, at import, so the
fixture also sets the module-level values it has already read.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from conftest import arxiv_spec, paper
from lmtune.core.errors import DataError
from lmtune.data.hf_source import iter_hf_rows
from lmtune.data.records import SkipCounts, records_from_rows

datasets = pytest.importorskip("datasets")

THEIR_COLUMNS = {"id": "paper_id", "title": "paper_title", "abstract": "summary", "primary_category": "label"}
ARXIV = arxiv_spec()
THEIRS = replace(ARXIV, rename=THEIR_COLUMNS)


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Offline mode and caches under tmp_path, both in the environment and in what `datasets` already read."""
    import huggingface_hub.constants as hub_constants
    from datasets import config

    home = tmp_path / "hf-home"
    cache = home / "datasets"
    for var, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_CACHE": str(home / "hub"),
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    return cache


def _their_rows() -> dict[str, list]:
    """Columns named as another dataset would name them, with whitespace to collapse and one empty abstract."""
    return {
        "paper_id": ["2101.00001", "2101.00002", "2101.00003", "2101.00004"],
        "paper_title": ["  Sparse   attention\nfor long documents ", "Graph nets", "No abstract here", "Robust RL"],
        "summary": ["We study\tsparse  attention.", "  Message passing\n\non graphs. ", "   ", "Policies that adapt."],
        "label": ["cs.CL", "cs.LG", "cs.AI", "cs.AI"],
    }


def test_saved_dataset_with_mapped_columns_gives_exact_records(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(_their_rows()).save_to_disk(str(folder))

    rows, where, _ = iter_hf_rows(str(folder), spec=THEIRS)
    skips = SkipCounts()
    records = records_from_rows(rows, where, skips, THEIRS)

    assert where == f"hf:{folder}"
    assert records == [
        paper("2101.00001", "Sparse attention for long documents", "We study sparse attention.", "cs.CL"),
        paper("2101.00002", "Graph nets", "Message passing on graphs.", "cs.LG"),
        paper("2101.00004", "Robust RL", "Policies that adapt.", "cs.AI"),
    ]  # fmt: skip
    assert skips.counts == {"missing or empty 'abstract'": 1}


def test_rows_are_yielded_unrenamed_as_plain_dicts(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(_their_rows()).with_format("numpy").save_to_disk(str(folder))

    rows, *_ = iter_hf_rows(str(folder), spec=THEIRS)
    first = next(rows)

    assert type(first) is dict
    assert set(first) == {"paper_id", "paper_title", "summary", "label"}  # renaming is the caller's job
    assert type(first["paper_id"]) is str  # a saved numpy format does not leak arrays into records


def _dataset_dict(tmp_path):
    def split(ids):
        return datasets.Dataset.from_dict(
            {
                "id": ids,
                "title": [f"Title {i}" for i in ids],
                "abstract": [f"Abstract {i}" for i in ids],
                "primary_category": ["cs.LG"] * len(ids),
            }
        )

    folder = tmp_path / "saved-dict"
    datasets.DatasetDict(train=split(["a1", "a2", "a3"]), test=split(["b1"])).save_to_disk(str(folder))
    return folder


def test_saved_dataset_dict_selects_the_split(tmp_path):
    folder = _dataset_dict(tmp_path)

    train_rows, train_where, _ = iter_hf_rows(str(folder), split="train")
    test_rows, test_where, _ = iter_hf_rows(str(folder), split="test")

    assert [r.id for r in records_from_rows(train_rows, train_where, SkipCounts(), ARXIV)] == ["a1", "a2", "a3"]
    assert records_from_rows(test_rows, test_where, SkipCounts(), ARXIV) == [
        paper("b1", "Title b1", "Abstract b1", "cs.LG")
    ]
    assert test_where == f"hf:{folder}[test]"


def test_saved_dataset_dict_unknown_split_lists_the_available_ones(tmp_path):
    folder = _dataset_dict(tmp_path)

    with pytest.raises(DataError) as err:
        iter_hf_rows(str(folder), split="validation")

    message = str(err.value)
    assert "data.hf_split=validation" in message
    assert "['test', 'train']" in message


def test_local_folder_of_jsonl_files_goes_through_load_dataset(tmp_path, offline_hf):
    folder = tmp_path / "jsonl-folder"
    folder.mkdir()
    for split, ids in {"train": ["t1", "t2"], "test": ["x1"]}.items():
        lines = [
            {"id": i, "title": f"Paper {i}", "abstract": f"About {i}.", "categories": ["cs.CV", "cs.LG"]} for i in ids
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    rows, where, _ = iter_hf_rows(str(folder), split="test")
    records = records_from_rows(rows, where, SkipCounts(), ARXIV)

    assert where == f"hf:{folder}[test]"
    assert records == [paper("x1", "Paper x1", "About x1.", "cs.CV")]
    assert any(offline_hf.rglob("*.arrow"))  # the built table went to the tmp cache, not the user's home


def test_missing_column_without_mapping_names_the_field_and_data_columns(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(_their_rows()).save_to_disk(str(folder))

    with pytest.raises(DataError) as err:
        iter_hf_rows(str(folder), spec=ARXIV)

    message = str(err.value)
    assert "abstract" in message and "id" in message
    assert "data.columns" in message
    assert message.startswith(f"hf:{folder}")


def test_unknown_hub_dataset_offline_is_a_quick_one_line_error():
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        iter_hf_rows("lmtune-tests/no-such-dataset", split="train")
    elapsed = time.monotonic() - start

    message = str(err.value)
    assert elapsed < 5, f"took {elapsed:.1f}s: something retried the network"
    assert "data.hf_name=lmtune-tests/no-such-dataset" in message
    assert "data.hf_split=train" in message
    assert "data.path=" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message and "Traceback" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
