"""The model card an export carries (README.md): front matter the Hugging Face hub accepts, the task, data,
training and test results as the run measured them, code that runs, and a card of its own for a merged model."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, compose_train, run_script
from helpers.card import run_card_code, run_card_command
from lmtune.artifacts.model_card import model_card, read_front_matter
from lmtune.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("card")
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    overrides.append("trainer.precision=32-true")  # as the card's plain-transformers code scores
    train(compose_train(overrides, run, cache_dir))
    return run


def test_the_card_reports_what_the_run_measured_under_hub_front_matter(run):
    card = (run / "export" / "README.md").read_text()
    meta = read_front_matter(card)
    formatting = json.loads((run / "export" / "formatting.json").read_text())
    labels = json.loads((run / "export" / "labels.json").read_text())
    assert "base_model" not in meta and formatting["base_model"]  # a local folder is no hub id (test below)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"lora", "text-classification"} <= set(meta["tags"]) and meta["metrics"] == ["accuracy", "f1"]

    summary = json.loads((run / "metrics.json").read_text())
    report, data = summary["report"], summary["data"]
    for name, key in (("fine-tuned", "fine-tuned"), ("zero-shot", "zero-shot"), ("TF-IDF + LR", "tf-idf")):
        interval = r" \[([\d.]+), ([\d.]+)\]"
        row = re.search(rf"^\| {re.escape(name)}[^|]* \| ([\d.]+){interval} \| ([\d.]+){interval} \|$", card, re.M)
        assert row, f"no {name} row"
        assert float(row[1]) == pytest.approx(report[f"report/{key}/acc"], abs=1e-4)
        assert float(row[4]) == pytest.approx(report[f"report/{key}/macro_f1"], abs=1e-4)
        assert float(row[2]) == pytest.approx(report[f"report/{key}/acc_low"], abs=1e-3)  # the 95% interval
        assert float(row[6]) == pytest.approx(report[f"report/{key}/macro_f1_high"], abs=1e-3)
    per_class = [line for line in card.splitlines() if line.split(" | ")[0].lstrip("| ") in labels]
    assert len(per_class) == len(labels)
    assert f"train / val / test = {data['train_examples']} / {data['val_examples']} / {data['test_examples']}" in card
    assert f"{summary['train']['steps']} steps, precision {summary['precision']}" in card
    assert "[More Information Needed]" not in card and "adapter: lora (r=2, alpha=4" in card


def test_the_card_s_command_and_code_run_and_end_with_the_same_label(run, cache_dir, tmp_path):
    export = run / "export"
    settings = ("format=json", "precision=32-true", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}")
    proc = run_card_command(export, *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    label = json.loads(proc.stdout.strip().splitlines()[-1])["label"]
    assert label in json.loads((export / "labels.json").read_text())
    assert run_card_code(export).splitlines() == [label]  # the code alone ends with predict.py's label


def test_the_card_names_no_path_of_the_training_machine(run, cache_dir):
    card = (run / "export" / "README.md").read_text()
    for path in (run, cache_dir, ROOT):
        assert str(path) not in card
    assert "`arxiv_sample.jsonl`" in card and "a local model (folder `tiny-random-" in card
    assert "base_model" not in read_front_matter(card)  # the tiny model has no hub id


def test_front_matter_has_the_license_and_dataset_where_known():
    inputs = dict(
        base_local=None,
        adapter_cfg={"kind": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        labels=["a", "b"],
        system_prompt="Answer.",
        user_template="{text}",
        truncate_column=None,
        max_length=256,
        training={},
        results={"fine-tuned": {"acc": 0.5, "macro_f1": 0.5}},
        per_class=None,
    )
    hub = model_card(
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        model_cfg={"license": "apache-2.0"},
        data={"source": "hf:stanfordnlp/imdb[train]"},
        **inputs,
    )
    meta = read_front_matter(hub)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["stanfordnlp/imdb"] and "the Hugging Face dataset `stanfordnlp/imdb`" in hub
    local = model_card(
        base_model="/models/base",
        model_cfg={},
        data={"source": "hf:/data/saved/set[train]"},
        **{**inputs, "base_local": "/models/base"},
    )
    meta = read_front_matter(local)
    assert not {"base_model", "license", "datasets"} & set(meta)
    assert "/models" not in local and "/data/saved" not in local and "a local dataset folder `set`" in local


def test_a_merged_export_gets_its_own_card(run, cache_dir, tmp_path):
    out = tmp_path / "merged"
    proc = run_script(
        "merge.py", f"ckpt={run}", f"out={out}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'h'}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    meta = read_front_matter(card)
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert "merged into the base: the base in float32" in card
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    assert "PeftModel" not in code and "AutoModelForCausalLM.from_pretrained(folder)" in code
