"""The model card an export carries (README.md): front matter the Hugging Face hub accepts, the task, data,
training and test results as the run measured them, code that runs, and a card of its own for a merged model."""

from __future__ import annotations

import json
import re

import pytest

from conftest import compose_train, run_script
from lmtune.artifacts.model_card import read_front_matter
from lmtune.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("card")
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=4"]
    train(compose_train(overrides, run, cache_dir))
    return run


def test_the_card_reports_what_the_run_measured_under_hub_front_matter(run):
    card = (run / "export" / "README.md").read_text()
    meta = read_front_matter(card)
    formatting = json.loads((run / "export" / "formatting.json").read_text())
    labels = json.loads((run / "export" / "labels.json").read_text())
    assert meta["base_model"] == formatting["base_model"]
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"lora", "text-classification"} <= set(meta["tags"]) and meta["metrics"] == ["accuracy", "f1"]

    summary = json.loads((run / "metrics.json").read_text())
    report, data = summary["report"], summary["data"]
    for name, key in (("fine-tuned", "fine-tuned"), ("zero-shot", "zero-shot"), ("TF-IDF + LR", "tf-idf")):
        row = re.search(rf"^\| {re.escape(name)}[^|]* \| ([\d.]+) \| ([\d.]+) \|$", card, re.M)
        assert row, f"no {name} row"
        assert float(row[1]) == pytest.approx(report[f"report/{key}/acc"], abs=1e-4)
        assert float(row[2]) == pytest.approx(report[f"report/{key}/macro_f1"], abs=1e-4)
    per_class = [line for line in card.splitlines() if line.split(" | ")[0].lstrip("| ") in labels]
    assert len(per_class) == len(labels)
    assert f"train / val / test = {data['train_examples']} / {data['val_examples']} / {data['test_examples']}" in card
    assert f"{summary['train']['steps']} steps, precision {summary['precision']}" in card
    assert "[More Information Needed]" not in card and "adapter: lora (r=2, alpha=4" in card


def test_the_card_s_code_loads_the_model(run, monkeypatch):
    card = (run / "export" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    monkeypatch.chdir(run / "export")  # the snippet reads "this folder"
    scope: dict = {}
    exec(code, scope)
    assert scope["labels"] == json.loads((run / "export" / "labels.json").read_text())
    assert hasattr(scope["model"], "peft_config") and scope["tokenizer"].chat_template


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
