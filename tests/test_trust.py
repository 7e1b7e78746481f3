"""Probabilities a user can act on: temperature scaling recovers a known temperature, conformal label sets reach their
coverage, the risk-coverage curve ranks rows by confidence, bootstrap intervals are reproducible and cover the
point estimate, McNemar's test counts the rows where the models disagree.

Synthetic data with a known answer: labels drawn from softmax(logits / T_true), so the temperature that fits is
T_true and a set at coverage 0.9 holds the true label 90% of the time on fresh rows.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers.wandb_files import read_run
from lmtune.evaluation.comparison import bootstrap_intervals, mcnemar, resamples, verdict
from lmtune.evaluation.metrics import classification_metrics
from lmtune.evaluation.trust import accuracy_at_coverage, ece_floor, risk_coverage, set_metrics
from lmtune.model.calibration import Calibration, conformal_threshold, fit_temperature, label_set


def synthetic(n: int, labels: int, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores whose calibrated probabilities are softmax(scores / temperature): labels drawn from them."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, labels, generator=generator, dtype=torch.float64) * 3
    true = torch.multinomial(torch.softmax(scores / temperature, -1), 1, generator=generator).squeeze(1)
    return scores, true


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_scaling_recovers_the_temperature_the_labels_were_drawn_with(temperature):
    scores, true = synthetic(20000, 6, temperature, seed=1)
    assert fit_temperature(scores, true) == pytest.approx(temperature, rel=0.05)


def test_temperature_scaling_lowers_the_calibration_error_and_keeps_every_prediction():
    scores, true = synthetic(20000, 6, 2.5, seed=2)
    calibration = Calibration.fit(scores[:10000], true[:10000], "val")
    before, after = torch.softmax(scores[10000:], -1), calibration.probs(scores[10000:])
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    labels, held_out = [str(k) for k in range(6)], true[10000:].tolist()
    ece = lambda p: classification_metrics(held_out, p.argmax(-1).tolist(), labels, p.float())["ece"]  # noqa: E731
    assert ece(before) > 0.1 and ece(after) < 0.02


def test_the_ece_floor_is_what_a_calibrated_model_shows_on_that_many_rows():
    """400 rows drawn from their own probabilities (calibrated by construction): their measured ECE, averaged over
    draws, is the floor; a model twice too sure sits far above it; 16x the rows, a quarter of the floor."""
    labels = [str(k) for k in range(6)]
    floors, measured = [], []
    for seed in range(20):
        scores, true = synthetic(400, 6, 1.0, seed=100 + seed)
        probs = torch.softmax(scores, -1)
        floors.append(ece_floor(probs))
        measured.append(classification_metrics(true.tolist(), probs.argmax(-1).tolist(), labels, probs)["ece"])
    assert np.mean(measured) == pytest.approx(np.mean(floors), rel=0.15)
    assert 0.02 < np.mean(floors) < 0.1
    scores, true = synthetic(400, 6, 1.0, seed=7)
    too_sure = torch.softmax(2 * scores, -1)
    ece = classification_metrics(true.tolist(), too_sure.argmax(-1).tolist(), labels, too_sure)["ece"]
    assert ece > 2 * ece_floor(too_sure)
    scores, _ = synthetic(6400, 6, 1.0, seed=8)
    assert ece_floor(torch.softmax(scores, -1)) == pytest.approx(np.mean(floors) / 4, rel=0.25)


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_conformal_sets_hold_the_true_label_as_often_as_asked_on_fresh_rows(coverage):
    """Calibrated on 1,000 rows, measured on 20,000 others: coverage within 2 points of the target, at least the
    target minus sampling noise (the guarantee is >= coverage on average over calibration draws)."""
    scores, true = synthetic(21000, 8, 1.5, seed=3)
    calibration = Calibration.fit(scores[:1000], true[:1000], "val")
    threshold = calibration.threshold(coverage)
    labels = [str(k) for k in range(8)]
    measured = set_metrics(calibration.probs(scores[1000:]), true[1000:].tolist(), labels, threshold)
    assert measured["coverage"] == pytest.approx(coverage, abs=0.02)
    assert 1 <= measured["mean_size"] < 8


def test_a_conformal_threshold_is_the_right_order_statistic_and_a_set_is_never_empty():
    scores = [0.1 * k for k in range(10)]  # 0.0 .. 0.9
    assert conformal_threshold(scores, 0.5) == pytest.approx(0.5)  # ceil(11 * 0.5) = 6th smallest
    assert conformal_threshold(scores, 0.95) == math.inf  # 11 * 0.95 > 10: every label
    with pytest.raises(ValueError, match="coverage=1"):
        conformal_threshold(scores, 1)
    assert label_set([0.2, 0.5, 0.3], ["a", "b", "c"], threshold=0.0) == ["b"]  # the top label even at 0
    assert label_set([0.2, 0.5, 0.3], ["a", "b", "c"], threshold=0.75) == ["b", "c"]  # p >= 0.25
    assert label_set([0.2, 0.5, 0.3], ["a", "b", "c"], threshold=math.inf) == ["b", "c", "a"]


def test_sets_against_every_label_of_a_row():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    measured = set_metrics(probs, [1, 0], ["a", "b", "c"], threshold=0.5, all_labels=[["b", "a"], ["a", "b"]])
    assert measured["coverage"] == 0.0  # {a} misses b, {c} misses a
    assert measured["coverage_any_label"] == 0.5  # row 0's set {a} is one of its labels


def test_risk_coverage_answers_the_most_confident_rows_first():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    true = [0, 1, 1, 0]  # right, wrong, right, right; confidence order: 0, 2, 1, 3
    coverages, accuracies = risk_coverage(probs, true)
    assert coverages == [0.25, 0.5, 0.75, 1.0]
    assert accuracies == pytest.approx([1.0, 1.0, 2 / 3, 0.75])
    assert accuracy_at_coverage(probs, true, 0.5) == 1.0 and accuracy_at_coverage(probs, true, 1.0) == 0.75


def test_a_calibration_file_read_back_is_checked():
    good = Calibration(1.7, [0.1, 0.5], "val: 2 rows").to_dict()
    assert Calibration.from_dict(good).temperature == 1.7
    for bad, message in (
        ({**good, "temperature": -1}, "temperature must be a positive number"),
        ({**good, "temperature": "2"}, "temperature must be a positive number"),
        ({**good, "scores": [0.1, 7]}, "scores must be a list of numbers from 0 to 1"),
        ({**good, "scores": "0.1"}, "scores must be a list"),
    ):
        with pytest.raises(ValueError, match=message):
            Calibration.from_dict(bad)


def test_bootstrap_intervals_are_reproducible_with_a_seed_and_contain_the_estimate():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 400)
    pred = np.where(rng.random(400) < 0.7, true, rng.integers(0, 4, 400))
    labels = ["a", "b", "c", "d"]
    point = classification_metrics(true.tolist(), pred.tolist(), labels)
    first = bootstrap_intervals(true, pred, 4, resamples(400, seed=5))
    assert first == bootstrap_intervals(true, pred, 4, resamples(400, seed=5))
    assert first != bootstrap_intervals(true, pred, 4, resamples(400, seed=6))
    for name in ("acc", "macro_f1"):
        low, high = first[name]
        assert low < point[name] < high
    # about +-4.5 points at 400 rows and 70% accuracy (1.96 * sqrt(0.7 * 0.3 / 400))
    assert first["acc"][1] - first["acc"][0] == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 400), rel=0.15)


def test_the_bootstraps_macro_f1_is_the_reports_macro_f1_invalid_answers_included():
    true = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, -1, 2, 2, 0])
    identity = np.arange(len(true))[None, :]  # one "resample": the rows themselves
    point = classification_metrics(true.tolist(), pred.tolist(), ["a", "b", "c"])
    intervals = bootstrap_intervals(true, pred, 3, identity)
    assert intervals["macro_f1"] == pytest.approx([point["macro_f1"]] * 2)
    assert intervals["acc"] == pytest.approx([point["acc"]] * 2)


def test_mcnemar_counts_the_disagreements_and_says_when_there_is_no_win():
    true = np.zeros(100, dtype=int)
    a = np.zeros(100, dtype=int)
    b = np.zeros(100, dtype=int)
    a[:10] = 1  # A wrong on 10 rows
    b[10:40] = 1  # B wrong on 30 others
    test = mcnemar(true, a, b)
    assert (test["a_only"], test["b_only"]) == (30, 10)
    assert test["p_value"] < 0.01
    assert verdict("the fine-tuned model", "TF-IDF", 0.9, 0.7, test).startswith("The fine-tuned model beats TF-IDF")
    close = mcnemar(true, a, np.where(np.arange(100) < 12, 1, 0))  # 12 vs 10 wrong, overlapping
    assert close["p_value"] > 0.05
    assert "does **not** beat TF-IDF by more than chance" in verdict("the model", "TF-IDF", 0.90, 0.88, close)
    assert mcnemar(true, a, a)["p_value"] == 1.0


# ------------------------------------------------------------------------------- through training, eval, predict, serve
@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """The smoke recipe on the sample (its `categories` list every label of a paper), split by time."""
    from conftest import compose_train
    from lmtune.training.train import train

    run = tmp_path_factory.mktemp("run")
    overrides = ["experiment=smoke", "data.split=time", "data.date_column=published"]  # W&B offline
    metrics, objects = train(compose_train([*overrides, "data.labels_column=categories"], run, cache_dir))
    return run, metrics, objects


def test_training_calibrates_on_validation_and_the_report_says_what_each_prediction_is_worth(trained, cache_dir):
    from lmtune.evaluation.predictor import Predictor, Row

    run, metrics, objects = trained
    dm = objects["datamodule"]
    calibration = json.loads((run / "export" / "calibration.json").read_text())
    assert calibration["temperature"] > 0 and len(calibration["scores"]) == len(dm.splits["val"])
    # refitting on the exported model's validation scores gives the exported temperature and scores
    predictor = Predictor.from_export(run / "export", cache_dir, torch.device("cpu"))
    scores, _ = predictor.scores([Row(r.fields, r.id) for r in dm.splits["val"]])
    refit = Calibration.fit(scores, [dm.labels.index(r.label) for r in dm.splits["val"]], "again")
    assert refit.temperature == pytest.approx(calibration["temperature"], rel=1e-3)
    assert refit.scores == pytest.approx(calibration["scores"], abs=1e-4)
    tuned = json.loads((run / "eval_metrics.json").read_text())["metrics"]
    assert {"ece", "ece_uncalibrated", "ece_floor", "temperature", "sets", "acc_at_coverage", "acc_any_label"} <= set(
        tuned
    )
    assert tuned["acc_interval"][0] <= tuned["acc"] <= tuned["acc_interval"][1]
    assert tuned["acc_any_label"] >= tuned["acc"] - 1e-6  # the primary category is one of the paper's categories
    report = (run / "report.md").read_text()
    assert "## Acting on the predictions (fine-tuned)" in report and "## Fine-tuned against TF-IDF" in report
    assert f"temperature {tuned['temperature']:.3f}" in report and "McNemar p =" in report
    assert f"would show {tuned['ece_floor']:.3f} on this many papers" in report
    assert "split time (train " in report
    assert (run / "reliability.png").stat().st_size > 0 and (run / "risk_coverage.png").stat().st_size > 0
    # the time split: every training paper is older than every validation paper, older than every test paper
    dates = dm.stats["dates"]
    assert dates["train"][1] <= dates["val"][0] <= dates["val"][1] <= dates["test"][0]
    summary = json.loads((run / "metrics.json").read_text())["report"]
    verdict_line = summary["report/vs_tfidf/verdict"]
    card = (run / "export" / "README.md").read_text()
    assert verdict_line in report and verdict_line in card and "split by time" in card
    assert verdict_line.startswith("The fine-tuned model") and "TF-IDF + LR" in verdict_line
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    logged = read_run(wandb_run)["summary"]
    assert logged["report/vs_tfidf/p_value"] == pytest.approx(summary["report/vs_tfidf/p_value"])
    assert logged["test/rank/ece_uncalibrated"] == pytest.approx(tuned["ece_uncalibrated"])
    assert logged["test/rank/ece_floor"] == pytest.approx(tuned["ece_floor"])
    assert logged["test/rank/acc_low"] == pytest.approx(tuned["acc_interval"][0])


def test_eval_gives_the_reports_calibrated_numbers(trained, cache_dir, tmp_path):
    from test_eval import eval_in_process

    run, _, _ = trained
    results = eval_in_process([f"ckpt={run / 'export'}"], tmp_path, cache_dir)["rank"]
    tuned = json.loads((run / "eval_metrics.json").read_text())["metrics"]
    for key in ("acc", "macro_f1", "ece", "ece_uncalibrated", "acc_interval", "sets", "acc_at_coverage"):
        assert results[key] == pytest.approx(tuned[key], abs=1e-6), key


def test_predict_gives_label_sets_and_abstains_under_min_confidence(trained, cache_dir, tmp_path):
    from conftest import run_script

    run, _, objects = trained
    record = objects["datamodule"].splits["test"][0]
    row = "row={" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in record.fields.items()) + "}"
    common = [f"ckpt={run / 'export'}", f"paths.cache_dir={cache_dir}", "format=json", row, f"hydra.run.dir={tmp_path}"]
    proc = run_script("predict.py", *common, "coverage=0.9", "min_confidence=0.999")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["label"] == "abstain" and answer["label_set"] and set(answer["label_set"]) <= set(answer["probs"])
    ranked = list(answer["probs"])
    assert answer["label_set"] == ranked[: len(answer["label_set"])]  # the most probable labels, in order
    from lmtune.core.errors import UserError
    from lmtune.model.calibration import checked_threshold

    for setting, message in (
        ({"coverage": 1.5}, "coverage=1.5: a fraction between 0 and 1"),
        ({"min_confidence": 2}, "min_confidence=2: a probability"),
    ):
        with pytest.raises(UserError, match=message):  # predict and serve check both with it, before any model loads
            checked_threshold(None, setting.get("coverage"), setting.get("min_confidence"), "export")


def test_an_export_without_calibration_refuses_label_sets_in_one_line(trained, tmp_path):
    import shutil

    from lmtune.core.errors import UserError
    from lmtune.model.calibration import checked_threshold

    run, _, _ = trained
    old = tmp_path / "export"
    shutil.copytree(run / "export", old)
    (old / "calibration.json").unlink()
    from lmtune.artifacts.export import read_export

    export = read_export(old)
    assert export.calibration is None
    with pytest.raises(UserError, match="has no calibration.json"):
        checked_threshold(export.calibration, 0.9, None, str(old))
    (old / "calibration.json").write_text('{"temperature": "hot", "scores": []}')
    with pytest.raises(UserError, match="temperature must be a positive number"):
        read_export(old)


def test_the_server_answers_with_label_sets_and_abstains(trained, cache_dir, tmp_path):
    from helpers.server import Server

    run, _, objects = trained
    record = objects["datamodule"].splits["test"][0]
    settings = ["coverage=0.9", "min_confidence=0.999"]
    server = Server(tmp_path, f"ckpt={run / 'export'}", f"paths.cache_dir={cache_dir}", *settings)
    try:
        status, answer = server.predict(record.fields)
    finally:
        server.stop()
    assert status == 200 and answer["label"] == "abstain"
    assert answer["label_set"][0] == max(answer["probs"], key=answer["probs"].get)


def test_calibration_can_use_more_validation_rows_than_validation_during_training(tmp_path, cache_dir):
    """`data.calibration_rows`: the validation split beyond `limit_val`, the rows validated first (hash order)."""
    from conftest import compose_train
    from lmtune.training.instantiate import instantiate_data

    cfg = compose_train(["experiment=smoke", "data.limit_val=5", "data.calibration_rows=12"], tmp_path, cache_dir)
    dm = instantiate_data(cfg.data)
    dm.load_splits()
    validated = [r.id for r in dm.splits["val"]]
    calibrated = [r.id for r in dm.calibration_split(dm.calibration_rows)]
    assert len(validated) == 5 and len(calibrated) == 12 and calibrated[:5] == validated
    assert [r.id for r in dm.calibration_split(None)] == validated
