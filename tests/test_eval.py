"""eval.py and the end-of-training report: metrics against hand-computed values, real output files, a real
offline W&B run, zero-shot vs fine-tuned, rank vs generate."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import ROOT, compose_train, run_script
from helpers.cli_driver import run_commands
from helpers.wandb_files import read_run
from lmtune.commands.eval import run_eval as run_eval_task
from lmtune.evaluation.metrics import INVALID, classification_metrics, most_confused
from lmtune.evaluation.modes import parse_answer
from lmtune.training.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["cs.CL", "cs.CV", "cs.RO"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("run")
    metrics, objects = train(compose_train(["experiment=smoke", "logger=none"], run, cache_dir))
    return run, metrics, objects


def eval_in_process(overrides: list[str], out, cache_dir) -> dict:
    """`src/eval.py` without a subprocess: the composed eval config, outputs in `out`."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval.yaml", overrides=["logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(out), str(cache_dir)
    return run_eval_task(cfg)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------- metrics by hand


def test_metrics_match_hand_computed_values_with_an_invalid_answer():
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, INVALID, 2, 0]
    m = classification_metrics(true, pred, ["a", "b", "c"])
    assert m["acc"] == pytest.approx(3 / 6) and m["invalid_rate"] == pytest.approx(1 / 6) and m["n"] == 6
    # a: predicted twice, right once; b: predicted twice, right once, one true b answered invalid; c: 1 of 2 found
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]]
    assert m["confusion_columns"] == ["a", "b", "c", "(invalid)"]
    assert most_confused(m, ["a", "b", "c"]) == [("a", "b", 1), ("b", "(invalid)", 1), ("c", "a", 1)]


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right) and 0.6 (wrong) fall in different bins: (|0.9 - 1| + |0.6 - 0|) / 2
    m = classification_metrics([0, 1], [0, 0], ["a", "b"], probs=torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    assert m["ece"] == pytest.approx(0.35, abs=1e-6)


@pytest.mark.parametrize(
    "text, expected",
    [("cs.CV", 1), (" cs.RO.", 2), ("`cs.CL`", 0), ("**cs.CV**", 1), ("cs.AI", INVALID), ("It is cs.CV", INVALID)],
)
def test_generated_answers_are_parsed_strictly(text, expected):
    assert parse_answer(text, LABELS) == expected


# ------------------------------------------------------------------------------------------------ eval.py


def test_eval_cli_writes_every_output_and_a_real_wandb_run(trained, cache_dir, tmp_path):
    run, train_metrics, objects = trained
    out = tmp_path / "eval"
    proc = run_script(
        "eval.py",
        f"ckpt={run / 'export'}",
        "eval.mode=both",
        "logger=wandb",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={cache_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    test_ids = [r.id for r in objects["datamodule"].splits["test"]]

    document = json.loads((out / "eval_metrics.json").read_text())
    metrics = document["metrics"]
    # the export is evaluated on its own run's test split: the same accuracy training reported
    assert metrics["acc"] == pytest.approx(train_metrics["test/acc"], abs=1e-6)
    assert metrics["n"] == len(test_ids) and 0 <= metrics["ece"] <= 1 and document["mode"] == "rank"
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == test_ids  # one line per example, in split order
    assert all(r["predicted"] == next(iter(r["probs"])) and r["true"] in LABELS for r in rows)
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    assert matplotlib.image.imread(out / "confusion_matrix.png").shape[2] in (3, 4)
    table = (out / "per_class.md").read_text()
    assert all(f"| {label} |" in table for label in LABELS)

    generated = json.loads((out / "generate" / "eval_metrics.json").read_text())["metrics"]
    assert 0 <= generated["invalid_rate"] <= 1 and "rank_generate_agreement" in generated
    answers = read_jsonl(out / "generate" / "predictions.jsonl")
    assert len(answers) == len(test_ids) and all("answer" in r for r in answers)
    assert "rank and generate agree on" in proc.stdout

    (wandb_dir,) = (out / "wandb").glob("offline-run-*")
    wandb_run = read_run(wandb_dir)
    assert wandb_run["summary"]["test/rank/acc"] == pytest.approx(metrics["acc"])
    assert wandb_run["summary"]["test/generate/invalid_rate"] == pytest.approx(generated["invalid_rate"])
    (table_file,) = (wandb_dir / "files" / "media" / "table" / "test" / "rank").glob("predictions_*.table.json")
    logged = json.loads(table_file.read_text())
    assert logged["columns"] == ["id", "title", "abstract", "true", "predicted", "p(predicted)"]  # the prompt's
    assert [row[0] for row in logged["data"]] == test_ids
    assert list((wandb_dir / "files" / "media" / "images" / "test" / "rank").glob("confusion_matrix_image_*.png"))


def test_zero_shot_and_fine_tuned_give_different_predictions(trained, cache_dir, tmp_path):
    run, _, _ = trained
    tuned, zero = tmp_path / "tuned", tmp_path / "zero"
    eval_in_process([f"ckpt={run}"], tuned, cache_dir)
    eval_in_process(["ckpt=null", "experiment=smoke"], zero, cache_dir)
    tuned_rows, zero_rows = read_jsonl(tuned / "predictions.jsonl"), read_jsonl(zero / "predictions.jsonl")
    assert [r["id"] for r in tuned_rows] == [r["id"] for r in zero_rows]  # same split, same order
    assert any(t["probs"] != z["probs"] for t, z in zip(tuned_rows, zero_rows, strict=True))


def test_a_checkpoint_file_evaluates_like_the_export_it_was_exported_as(trained, cache_dir, tmp_path):
    run, _, _ = trained
    (best,) = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    eval_in_process([f"ckpt={best}"], tmp_path / "ckpt", cache_dir)
    eval_in_process([f"ckpt={run / 'export'}"], tmp_path / "export", cache_dir)
    from_ckpt = read_jsonl(tmp_path / "ckpt" / "predictions.jsonl")
    from_export = read_jsonl(tmp_path / "export" / "predictions.jsonl")
    for a, b in zip(from_ckpt, from_export, strict=True):
        assert a["predicted"] == b["predicted"] and a["probs"] == pytest.approx(b["probs"], abs=1e-4)


def test_eval_errors_are_one_line(cache_dir, tmp_path):
    cases = {
        ("ckpt=null", "experiment=smoke", "split=dev"): "split='dev': use one of train, val, test",
        (f"ckpt={tmp_path}/missing.ckpt",): "checkpoint not found",
        (): "ckpt= is required",
    }
    common = ["logger=none", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    commands = [{"script": "src/eval.py", "args": [*args, *common]} for args in cases]
    for message, proc in zip(cases.values(), run_commands(commands, tmp_path, "eval-errors"), strict=True):
        assert proc["returncode"] == 1 and message in proc["stderr"], proc["stderr"]
        assert "Traceback" not in proc["stderr"]


# --------------------------------------------------------------------------------- end-of-training report


def test_training_writes_a_report_with_zero_shot_tfidf_and_a_cached_baseline(trained, cache_dir, tmp_path, caplog):
    run, metrics, objects = trained
    report = (run / "report.md").read_text()
    for row in ("| fine-tuned |", "| zero-shot |", "| TF-IDF + LR ("):
        assert row in report
    assert "## Most confused" in report and "tokens/s" in report
    tuned = json.loads((run / "eval_metrics.json").read_text())["metrics"]
    assert tuned["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    summary = json.loads((run / "metrics.json").read_text())["report"]
    zero = json.loads((run / "zero_shot" / "eval_metrics.json").read_text())["metrics"]
    assert summary["report/zero-shot/acc"] == zero["acc"] and summary["report/fine-tuned/acc"] == tuned["acc"]

    # the zero-shot pass equals scoring the plain base model, and a second run takes it from the cache
    from lmtune.evaluation.report import zero_shot_metrics

    module, dm = objects["module"], objects["datamodule"]
    with caplog.at_level("INFO"):
        again = zero_shot_metrics(
            module,
            dm.formatter,
            dm.collator.pad_token_id,
            dm.splits["test"],
            dm.examples["test"],
            cache_dir,
            tmp_path,
            objects["trainer"].precision,
        )
    assert again == zero and "zero-shot metrics from the cache" in caplog.text
