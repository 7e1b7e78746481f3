"""One export, one number: the end-of-training report, `eval.py`, `predict.py` and the server score the same test
split to the same labels and probabilities, in bf16-mixed and in 32-true.

The smoke run's tiny model is barely trained, so its label probabilities are close together: the near-ties that
flipped between the report and eval when a prompt's scores depended on its batch."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers.cli_driver import run_commands
from helpers.server import Server

SAMPLE = "tests/assets/arxiv_sample.jsonl"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accuracy(labels: dict[str, str], true: dict[str, str]) -> float:
    return sum(labels[i] == true[i] for i in true) / len(true)


@pytest.mark.parametrize(
    "precision",
    ["bf16-mixed", pytest.param("32-true", marks=pytest.mark.slow)],  # fp32 too: in make test-slow
)
def test_report_eval_predict_and_serve_give_one_number(precision, cache_dir, tmp_path):
    run, evaluated, predicted = tmp_path / "run", tmp_path / "eval", tmp_path / "predictions.jsonl"
    common = [f"paths.cache_dir={cache_dir}", "logger=none"]
    train = ["experiment=smoke", f"trainer.precision={precision}", "report.zero_shot=false", "report.tfidf=false"]
    export = run / "export"
    results = run_commands(
        [
            {"script": "src/train.py", "args": [*train, f"hydra.run.dir={run}", *common]},
            {"script": "src/eval.py", "args": [f"ckpt={export}", f"hydra.run.dir={evaluated}", *common]},
            {
                "script": "src/predict.py",
                "args": [f"ckpt={export}", f"input={SAMPLE}", f"output={predicted}", f"hydra.run.dir={tmp_path}"]
                + common[:1],
            },
        ],
        tmp_path,
        "one-number",
    )
    for result in results:
        assert result["returncode"] == 0, result["stderr"][-3000:]
    assert json.loads((run / "metrics.json").read_text())["precision"] == precision

    report = {r["id"]: r for r in read_jsonl(run / "predictions.jsonl")}
    true = {i: r["true"] for i, r in report.items()}
    by_eval = {r["id"]: r for r in read_jsonl(evaluated / "predictions.jsonl")}
    by_predict = {r["id"]: r for r in read_jsonl(predicted) if r["id"] in report}
    sample = {r["id"]: r for r in map(json.loads, open(SAMPLE))}
    server = Server(tmp_path, f"ckpt={export}", *common[:1], "serve.max_batch_size=8", "serve.batch_timeout=0.2")
    try:
        bodies = [json.dumps({"title": sample[i]["title"], "abstract": sample[i]["abstract"]}).encode() for i in true]
        with ThreadPoolExecutor(max_workers=8) as pool:  # together: the server batches them as they come
            answers = list(pool.map(lambda body: server.request("POST", "/predict", body), bodies))
    finally:
        server.stop()
    assert all(status == 200 for status, _ in answers), answers
    by_server = dict(zip(true, (answer for _, answer in answers), strict=True))

    labels = {
        "report": {i: r["predicted"] for i, r in report.items()},
        "eval": {i: r["predicted"] for i, r in by_eval.items()},
        "predict": {i: r["label"] for i, r in by_predict.items()},
        "serve": {i: r["label"] for i, r in by_server.items()},
    }
    assert labels["report"] == labels["eval"] == labels["predict"] == labels["serve"]
    reported = json.loads((run / "eval_metrics.json").read_text())["metrics"]["acc"]
    evaluated_acc = json.loads((evaluated / "eval_metrics.json").read_text())["metrics"]["acc"]
    assert reported == evaluated_acc == pytest.approx(accuracy(labels["predict"], true), abs=1e-7)  # (float32)
    assert accuracy(labels["predict"], true) == accuracy(labels["serve"], true)
    assert json.loads((run / "metrics.json").read_text())["test"]["test/acc"] == reported
    # the probabilities too, to the digits each output writes (the report and eval keep the top 3, rounded to 6)
    for i, r in report.items():
        for label, p in r["probs"].items():
            assert by_eval[i]["probs"][label] == p
            assert by_predict[i]["probs"][label] == pytest.approx(p, abs=1e-6)
            assert by_server[i]["probs"][label] == pytest.approx(p, abs=1e-6)
    # near-ties are there to be flipped: the test means something only if some top two are close
    margins = sorted(abs(a - b) for r in by_predict.values() for a, b in [list(r["probs"].values())[:2]])
    assert margins[0] < 0.01, margins[:3]
