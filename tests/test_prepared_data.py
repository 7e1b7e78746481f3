"""Prepared data (`lmtune.data.prepared`): the cached Arrow tables give exactly the examples, splits, truncation
and skips that reading and formatting the records in memory gives; a second run reads the cache, and every
change that alters the examples (file, prompt, label set, tokenizer, length) misses it."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import SAMPLE, arxiv_datamodule, arxiv_formatter, arxiv_spec
from lmtune.core.errors import DataError
from lmtune.data import prepared
from lmtune.data.batching import shard_for_eval
from lmtune.data.records import SPLITS, SkipCounts, SplitPlan, choose_labels, read_records, split_indices

SETTINGS = dict(top_k=3, val_fraction=0.2, test_fraction=0.2, max_length=216, limit_train=40, limit_test=12)


def sample_with_faults(path: Path) -> Path:
    """The sample file plus rows that are skipped: a duplicate id, an empty abstract, a label outside the top 3."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    rows += [
        rows[0],
        {**rows[1], "id": "9999.00001", "abstract": "  "},
        {**rows[2], "id": "9999.00002", "primary_category": "cs.XX", "categories": ["cs.XX"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def in_memory(tokenizer, path: Path, top_k, val_fraction, test_fraction, max_length, limit_train, limit_test):
    """The reference: records read into a list, the label set, hash splits and limits, each split formatted."""
    skips = SkipCounts()
    records = read_records(path, skips, arxiv_spec())
    labels = choose_labels(Counter(r.label for r in records), top_k, None)
    ids, record_labels = [r.id for r in records], [r.label for r in records]
    positions = split_indices(ids, record_labels, labels, SplitPlan(val_fraction, test_fraction), skips)
    limits = {"train": limit_train, "val": None, "test": limit_test}
    formatter = arxiv_formatter(tokenizer, labels, max_length)
    examples = {name: formatter.format([records[i] for i in positions[name][: limits[name]]]) for name in SPLITS}
    return skips.counts, labels, examples


def prepare(tokenizer, path: Path, cache: Path, **overrides):
    dm = arxiv_datamodule(tokenizer, str(path), cache_dir=str(cache), **{**SETTINGS, **overrides})
    dm.setup("fit")
    return dm


def entries(cache: Path) -> dict[str, int]:
    """The cache's files and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in (cache / "data").glob("*") if p.is_file()}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_prepared_examples_equal_formatting_in_memory(tiny_tokenizer, tmp_path, num_proc):
    path = sample_with_faults(tmp_path / "papers.jsonl")
    dm = prepare(tiny_tokenizer, path, tmp_path / "cache", num_proc=num_proc)
    skips, labels, expected = in_memory(tiny_tokenizer, path, **SETTINGS)

    assert dm.labels == labels
    assert (
        dm.skips.counts
        == skips
        == {
            "duplicate id": 1,
            "missing or empty 'abstract'": 1,
            "label outside the label set": 1,
        }
    )
    assert {name: list(examples) for name, examples in dm.examples.items()} == expected
    assert [len(dm.examples[s]) for s in SPLITS] == [40, len(expected["val"]), 12]
    truncated = dm.stats["truncated"]["train"]
    assert truncated == sum(e.truncated for e in expected["train"]) and 0 < truncated < 40  # both kinds present
    assert dm.examples["train"].lengths == [len(e.input_ids) for e in expected["train"]]
    assert [r.id for r in dm.splits["test"]] == [e.id for e in expected["test"]]  # records and examples agree
    assert dm.examples["train"].__getitems__([3, 1]) == [expected["train"][3], expected["train"][1]]


def test_a_second_run_reads_the_cache_and_each_change_misses_it(tiny_tokenizer, tmp_path, caplog):
    path = sample_with_faults(tmp_path / "papers.jsonl")
    cache = tmp_path / "cache"
    first = prepare(tiny_tokenizer, path, cache)
    before = entries(cache)
    assert sorted(n.split("-")[0] for n in before) == ["examples"] * 3 + ["records"] * 2  # arrow + manifest

    with caplog.at_level(logging.INFO, logger="lmtune.data.prepared"):
        second = prepare(tiny_tokenizer, path, cache)
    assert entries(cache) == before  # nothing rewritten
    assert "records from the cache" in caplog.text
    assert {n: list(e) for n, e in second.examples.items()} == {n: list(e) for n, e in first.examples.items()}
    assert second.skips.counts == first.skips.counts

    def new_entries(**overrides) -> set[str]:
        tokenizer = overrides.pop("tokenizer", tiny_tokenizer)
        known = entries(cache)
        prepare(tokenizer, overrides.pop("path", path), cache, **overrides)
        return {name.split("-")[0] for name in set(entries(cache)) - set(known)}

    assert new_entries(max_length=200) == {"examples"}
    assert new_entries(prompt={"system": "Name the category.", "user": "{title}\n{abstract}"}) == {"examples"}
    assert new_entries(top_k=None, labels=["cs.CL", "cs.CV"]) == {"examples"}
    assert new_entries(limit_train=41) == {"examples"}
    changed = copy.deepcopy(tiny_tokenizer)
    changed.add_tokens(["zqxj"])
    assert new_entries(tokenizer=changed) == {"examples"}
    with path.open("a") as f:  # the file grows: its records are read again
        f.write(json.dumps({"id": "9999.1", "title": "T", "abstract": "A.", "primary_category": "cs.CL"}) + "\n")
    assert new_entries() == {"records", "examples"}


def test_a_file_edited_in_place_with_its_size_and_mtime_restored_is_read_again(tiny_tokenizer, tmp_path):
    """The cache key notices what a same-size edit with the modification time set back leaves: the change time."""
    path = sample_with_faults(tmp_path / "papers.jsonl")
    cache = tmp_path / "cache"
    first = prepare(tiny_tokenizer, path, cache)
    assert "cs.XY" not in first.labels
    text, stat = path.read_text(), path.stat()
    edited = text.replace('"cs.CV"', '"cs.XY"')  # same length: the file keeps its size
    assert edited != text and len(edited) == len(text)
    time.sleep(0.01)  # a later change time, on file systems with coarse clocks
    with path.open("r+") as f:  # in place: same inode
        f.write(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ino,
    )
    second = prepare(tiny_tokenizer, path, cache, top_k=None)
    assert "cs.XY" in second.labels


def test_a_fault_in_a_worker_process_is_one_clear_error_and_leaves_no_entry(tiny_tokenizer, tmp_path):
    path = sample_with_faults(tmp_path / "papers.jsonl")
    with pytest.raises(DataError, match=r"the prompt without any of its 'abstract' is \d+ tokens.*raise data.max_len"):
        prepare(tiny_tokenizer, path, tmp_path / "cache", max_length=24, num_proc=2)
    assert not [n for n in entries(tmp_path / "cache") if n.startswith("examples-")]


def test_a_broken_file_leaves_no_half_written_records(tiny_tokenizer, tmp_path):
    path = sample_with_faults(tmp_path / "papers.jsonl")
    good = path.read_text()
    path.write_text(good + '{"id": "broken", "title": \n')
    with pytest.raises(DataError, match=r"papers.jsonl:100: malformed JSON"):
        prepare(tiny_tokenizer, path, tmp_path / "cache")
    assert entries(tmp_path / "cache") == {}  # no table, no manifest, no temporary file
    path.write_text(good)
    assert len(prepare(tiny_tokenizer, path, tmp_path / "cache").examples["train"]) == 40


def test_an_unusable_cache_folder_is_one_line_naming_it(tiny_tokenizer, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match=r"cannot write prepared data under .*cache/data .*paths.cache_dir="):
        prepare(tiny_tokenizer, sample_with_faults(tmp_path / "papers.jsonl"), blocker)


def test_long_reads_print_progress(tiny_tokenizer, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(prepared, "PROGRESS_EVERY", 40)
    with caplog.at_level(logging.INFO, logger="lmtune.data.prepared"):
        prepare(tiny_tokenizer, sample_with_faults(tmp_path / "papers.jsonl"), tmp_path / "cache")
    assert [line.split(" in ")[0].split(": ")[1] for line in caplog.messages if "rows/s" in line] == [
        "read 40 rows",
        "read 80 rows",
    ]


def test_eval_shards_read_on_demand_and_pad_with_marked_repeats(tiny_tokenizer, tmp_path):
    examples = prepare(tiny_tokenizer, sample_with_faults(tmp_path / "papers.jsonl"), tmp_path / "c").examples["test"]
    shards = [list(shard_for_eval(examples[:5], 2, rank)) for rank in (0, 1)]
    assert [e.id for e in shards[0]] == [examples[i].id for i in (0, 2, 4)]
    assert [e.id for e in shards[1]] == [examples[i].id for i in (1, 3, 0)]
    assert [e.padding for e in shards[1]] == [False, False, True]
