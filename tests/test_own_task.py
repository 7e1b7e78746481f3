"""A second task with only a data file and a config file (experiment=title_topics): paper titles alone -> three
coarse topics, from a CSV with other column names, other label names and no id column. It trains, evaluates,
predicts (a file and one row on the command line, with progress in the log) and ships a merged model that
plain transformers loads and that scores like the adapter."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SAMPLE, compose_train, run_script
from helpers.card import card_command, run_card_code, run_card_command
from helpers.cli_driver import run_commands
from helpers.fake_arxiv import read_jsonl
from lmtune.data.records import SkipCounts, read_records
from lmtune.evaluation.predictor import Predictor, Row
from lmtune.model.scoring import rank_scores
from lmtune.training.train import train

# the README's "Your own task" builds the same file from the repository's sample
TOPICS = {"cs.CL": "language", "cs.CV": "vision", "cs.GR": "vision", "cs.RO": "robots & control"}
LABELS = ["language", "robots & control", "vision"]


def write_topics_csv(source, path):
    """Title -> coarse topic, with this task's own column names, and no id column."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["headline", "topic", "year"])
        for row in read_jsonl(source):
            if row["primary_category"] in TOPICS:
                writer.writerow([row["title"], TOPICS[row["primary_category"]], row.get("published", "")[:4]])
    return path


def topics_overrides(data_path) -> list[str]:
    """The shipped experiment on the tiny model: only the model and the size of the run change."""
    return [
        "experiment=title_topics",
        f"data.path={data_path}",
        "model=tiny_random",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "data.max_length=192",  # the tiny tokenizer spends a token on every few characters
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.precision=32-true",
        "logger=none",
        "report.enabled=false",
    ]


@pytest.fixture(scope="module")
def topics(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("topics")
    data = write_topics_csv(SAMPLE, folder / "topics.csv")
    run = folder / "run"
    metrics, objects = train(compose_train(topics_overrides(data), run, cache_dir))
    return data, run, metrics, objects


def test_the_task_trains_from_its_own_columns_and_labels(topics):
    data, run, metrics, objects = topics
    dm = objects["datamodule"]
    assert dm.labels == LABELS and "test/acc" in metrics
    skips = SkipCounts()
    records = read_records(data, skips, dm.spec)
    titles = {row["title"] for row in read_jsonl(SAMPLE)}
    assert len(records) == len(titles) and all(len(r.id) == 16 for r in records)  # ids: a hash of the text
    assert skips.counts == {"duplicate text (no id column)": 96 - len(titles)}  # the same title twice: counted
    example = dm.examples["train"][0]
    prompt = dm.tokenizer.decode(example.input_ids[: example.prompt_length])
    headline = next(r for r in dm.splits["train"] if r.id == example.id).fields["headline"]
    assert f"Title: {headline}" in prompt and "Abstract" not in prompt
    assert "Answer with one of: language, robots & control, vision." in prompt
    assert dm.tokenizer.decode(example.input_ids[example.prompt_length :]).startswith(LABELS[example.label_index])
    formatting = json.loads((run / "export" / "formatting.json").read_text())
    assert formatting["user_template"] == "Title: {headline}" and formatting["label_column"] == ["topic"]
    assert formatting["truncate_column"] is None and formatting["id_column"] == "id"


def test_eval_and_the_tfidf_baseline_use_the_task(topics, cache_dir, tmp_path):
    data, run, _, objects = topics
    out = tmp_path / "baseline"
    eval_args = [f"ckpt={run}", "logger=none", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}"]
    baseline_args = [*topics_overrides(data), f"hydra.run.dir={out}", f"paths.cache_dir={cache_dir}"]
    commands = [{"script": "src/eval.py", "args": eval_args}, {"script": "src/baseline.py", "args": baseline_args}]
    proc, baseline_proc = run_commands(commands, tmp_path, "eval-baseline")
    assert proc["returncode"] == 0, proc["stderr"][-3000:]
    test_ids = [r.id for r in objects["datamodule"].splits["test"]]
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    assert [p["id"] for p in predictions] == test_ids and {p["true"] for p in predictions} <= set(LABELS)
    assert "rank scoring" in proc["stderr"] and f"{len(test_ids)}/{len(test_ids)} examples (100%)" in proc["stderr"]
    assert baseline_proc["returncode"] == 0, baseline_proc["stderr"][-3000:]
    baseline = json.loads((out / "eval_metrics.json").read_text())
    assert baseline["labels"] == LABELS and baseline["metrics"]["n"] == len(test_ids)


def test_predict_reads_a_file_of_the_tasks_columns_and_one_row_from_the_command_line(topics, cache_dir, tmp_path):
    data, run, _, objects = topics
    rows = tmp_path / "new.csv"
    rows.write_text('headline,topic\nParsing sentences with transformers,language\n"Grasping, fast",robots & control\n')
    common = [f"ckpt={run}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'h'}"]
    commands = [
        {"script": "src/predict.py", "args": [f"input={rows}", *common]},
        {
            "script": "src/predict.py",
            "args": ["row={headline: 'Parsing sentences with transformers'}", "format=json", *common],
        },
        {"script": "src/predict.py", "args": ["arxiv_id=2403.00010", *common]},
    ]
    from_file, one_row, by_id = run_commands(commands, tmp_path, "predict-task")
    assert from_file["returncode"] == 0, from_file["stderr"][-3000:]
    out = read_jsonl(tmp_path / "new.predictions.jsonl")
    assert [(r["headline"], r["true"]) for r in out] == [
        ("Parsing sentences with transformers", "language"),
        ("Grasping, fast", "robots & control"),
    ]
    assert all(r["label"] in LABELS and sorted(r["probs"]) == LABELS for r in out)
    assert "accuracy on 2 labelled rows" in from_file["stdout"]
    assert "rank scoring" in from_file["stderr"] and "2/2 examples (100%)" in from_file["stderr"]  # not a terminal

    assert one_row["returncode"] == 0, one_row["stderr"][-3000:]
    (line,) = one_row["stdout"].splitlines()
    assert json.loads(line)["probs"] == pytest.approx(out[0]["probs"], abs=1e-6)

    assert by_id["returncode"] == 1 and "this model's prompt reads headline" in by_id["stderr"]
    assert "Traceback" not in by_id["stderr"]


def test_the_card_s_command_and_code_run_for_the_task_s_own_columns(topics, cache_dir, tmp_path):
    _, run, _, _ = topics
    export = run / "export"
    assert "'row={headline: \"Some text.\"}'" in card_command(export)  # not headline=..., which Hydra refuses
    proc = run_card_command(export, "format=json", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    label = json.loads(proc.stdout.strip().splitlines()[-1])["label"]
    assert label in LABELS and run_card_code(export).splitlines() == [label]


def test_the_merged_export_loads_with_plain_transformers_and_scores_like_the_adapter(topics, cache_dir, tmp_path):
    data, run, _, objects = topics
    out = tmp_path / "merged"
    proc = run_script(
        "merge.py", f"ckpt={run}", f"out={out}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'h'}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    merged_note = json.loads((out / "formatting.json").read_text())["merged"]
    assert merged_note["dtype"] == "float32" and merged_note["into"] == "the base in float32"

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no peft involved
    assert not hasattr(plain, "peft_config")
    adapter = Predictor.from_export(run, cache_dir, torch.device("cpu"))
    records = objects["datamodule"].splits["test"]
    rows = [Row(r.fields, r.id) for r in records]
    prompts = [ids for ids, _ in adapter.formatter.fit_prompts([r.fields for r in rows])]
    theirs = rank_scores(plain, prompts, adapter.formatter.answer_ids, adapter.formatter.opening_ids)
    ours, _ = adapter.scores(rows)
    # LoRA merged exactly: the same model up to float rounding of W + BA
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    merged = Predictor.from_export(out, cache_dir, torch.device("cpu"))
    assert [p.category for p in merged.predict(rows)] == [p.category for p in adapter.predict(rows)]

    again = run_script("merge.py", f"ckpt={out}", f"out={tmp_path / 'twice'}", f"hydra.run.dir={tmp_path / 'h2'}")
    assert again.returncode == 1 and "a merged export has no adapter to merge" in again.stderr
