"""predict.py on a trained tiny export: by arXiv id (a real local API server), by text, by batch file, zero-shot."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import ROOT, SAMPLE, api_settings, arxiv_spec, compose_train, run_script
from helpers.cli_driver import run_commands
from helpers.fake_arxiv import Paper, Reply, closed_port_url, read_jsonl
from lmtune.artifacts.export import find_export
from lmtune.arxiv.lookup import verbatim_ids
from lmtune.commands.predict import predict
from lmtune.core.errors import UserError
from lmtune.data.records import SkipCounts, read_records
from lmtune.evaluation.predictor import Predictor, Row
from lmtune.model.scoring import rank_scores
from lmtune.training.train import train

LABELS = ["cs.CL", "cs.CV", "cs.RO"]
# 2403.00010 ends in a zero that Hydra's float parsing of `arxiv_id=2403.00010` would drop
ROBOT = Paper(
    "2403.00010v2",
    "Grasping with a robot arm",
    "We study robot grasping control.",
    "cs.RO",
    ("cs.RO",),
    "2024-03-01T00:00:00Z",
)
VISION = Paper(
    "2403.00020v1", "Depth from video", "We study images and camera depth.", "cs.CV", ("cs.CV",), "2024-03-02T00:00:00Z"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """The smoke experiment trained once, in fp32 on every machine: its run folder, export and in-memory objects."""
    run = tmp_path_factory.mktemp("run")
    overrides = ["experiment=smoke", "logger=none", "trainer.precision=32-true"]
    metrics, objects = train(compose_train(overrides, run, cache_dir))
    return run, objects


@pytest.fixture
def api(arxiv_server):
    arxiv_server.serve_papers([ROBOT, VISION])
    return arxiv_server


def predict_cfg(overrides: list[str], cache_dir, base_url: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("predict.yaml", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache_dir)
        cfg.arxiv.update(api_settings(base_url))
    return cfg


def assert_distribution(probs: dict, labels=LABELS) -> None:
    assert sorted(probs) == labels
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
    assert list(probs.values()) == sorted(probs.values(), reverse=True)


# ---------------------------------------------------------------------------------------------------- by id


def test_cli_by_id_prints_one_json_object_on_a_clean_stdout(trained, api, cache_dir, tmp_path):
    run, _ = trained
    proc = run_script(
        "predict.py",
        f"ckpt={run / 'export'}",
        "arxiv_id=2403.00010",
        "format=json",
        f"arxiv.base_url={api.url}",
        "arxiv.min_interval=0",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.splitlines()  # logs go to stderr: stdout is only the prediction
    result = json.loads(line)
    assert set(result) == {"id", "title", "label", "category", "probs"}
    assert result["category"] == result["label"]  # the deprecated alias, for one release
    assert result["id"] == "2403.00010" and result["title"] == ROBOT.title
    assert result["label"] in LABELS and result["label"] == next(iter(result["probs"]))
    assert_distribution(result["probs"])
    assert [q["id_list"] for q in api.requests] == ["2403.00010"]
    assert api.headers[0]["User-Agent"].startswith("lmtune/")


def test_id_spellings_are_kept_verbatim_from_the_command_line():
    assert verbatim_ids(["ckpt=x", "arxiv_id=2403.00010"]) == "2403.00010"
    assert verbatim_ids(["arxiv_id='https://arxiv.org/abs/2403.00010v2'"]) == "https://arxiv.org/abs/2403.00010v2"
    assert verbatim_ids(["arxiv_id=[2403.00010,math/0301230]"]) == ["2403.00010", "math/0301230"]
    assert verbatim_ids(["title=x"]) is None


@pytest.mark.parametrize("spelling", ["2403.00010v2", "arXiv:2403.00010", "https://arxiv.org/pdf/2403.00010v1"])
def test_by_id_accepts_versions_and_urls_and_matches_prediction_by_text(trained, api, cache_dir, spelling):
    run, _ = trained
    (by_id,) = predict(predict_cfg([f"ckpt={run}", f"arxiv_id={spelling}"], cache_dir, api.url), emit=lambda _: None)
    by_text_cfg = predict_cfg([f"ckpt={run}", f"title='{ROBOT.title}'", f"abstract='{ROBOT.abstract}'"], cache_dir, "")
    (by_text,) = predict(by_text_cfg, emit=lambda _: None)
    assert by_id.id == "2403.00010" and by_id.category == by_text.category
    assert by_id.probs == pytest.approx(by_text.probs, abs=1e-9)


@pytest.mark.parametrize(
    "arxiv_id, message",
    [
        ("2403.123", "not an arXiv id: '2403.123'"),
        ("2403.99999", "arXiv has no paper with id 2403.99999"),
    ],
)
def test_bad_or_unknown_ids_are_clear_errors(trained, api, cache_dir, arxiv_id, message):
    run, _ = trained
    with pytest.raises(UserError, match=message):
        predict(predict_cfg([f"ckpt={run}", f"arxiv_id={arxiv_id}"], cache_dir, api.url))


def test_api_error_entry_and_outage_are_clear_errors(trained, arxiv_server, cache_dir):
    run, _ = trained
    error_feed = (ROOT / "tests" / "assets" / "arxiv_atom" / "error_bad_id.xml").read_bytes()
    arxiv_server.queue.append(Reply(400, error_feed))
    with pytest.raises(UserError, match="arXiv API error: incorrect id format for 1234.12345"):
        predict(predict_cfg([f"ckpt={run}", "arxiv_id=2403.00010"], cache_dir, arxiv_server.url))
    arxiv_server.responder = lambda query: Reply(503, b"down for maintenance")
    with pytest.raises(UserError, match="could not be reached or did not answer properly after 2 attempts"):
        predict(predict_cfg([f"ckpt={run}", "arxiv_id=2403.00010"], cache_dir, arxiv_server.url))


def test_cli_errors_exit_nonzero_with_one_line_and_before_loading_the_model(trained, cache_dir, tmp_path):
    run, _ = trained
    common = [f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}"]
    cases = {
        ("arxiv_id=2403.1", f"ckpt={run}"): "error: arxiv_id=2403.1: not an arXiv id",
        ("arxiv_id=2403.00010", f"ckpt={run}", f"arxiv.base_url={closed_port_url()}"): "cannot reach the arXiv API",
        ("title=x", "abstract=y", f"ckpt={tmp_path / 'nowhere'}"): "not a trained export",
        (f"ckpt={run}",): "give exactly one of: input=",
        ("arxiv_id=2403.00010",): "error: ckpt= is required",
    }
    commands = [{"script": "src/predict.py", "args": [*args, *common]} for args in cases]
    for (args, message), proc in zip(cases.items(), run_commands(commands, tmp_path, "predict-errors"), strict=True):
        assert proc["returncode"] == 1 and message in proc["stderr"], (args, proc["stderr"][-2000:])
        assert "Traceback" not in proc["stderr"] and proc["stdout"] == ""
        assert proc["seconds"] < 60


# --------------------------------------------------------------------------------------- same as training


def test_prompts_and_scores_are_exactly_those_of_training(trained, cache_dir):
    run, objects = trained
    module, dm = objects["module"], objects["datamodule"]
    predictor = Predictor.from_export(run / "export", cache_dir, torch.device("cpu"))
    records = {r.id: r for r in read_records(SAMPLE, SkipCounts(), arxiv_spec())}
    examples = dm.examples["test"]
    texts = [Row(records[e.id].fields, e.id) for e in examples]

    fitted = predictor.formatter.fit_prompts([t.fields for t in texts])
    assert [ids for ids, _ in fitted] == [e.input_ids[: e.prompt_length] for e in examples]
    assert predictor.formatter.answer_ids == dm.formatter.answer_ids

    module.eval()
    trained_scores = rank_scores(
        module.causal_lm, [ids for ids, _ in fitted], dm.formatter.answer_ids, dm.formatter.opening_ids
    )
    scores, _ = predictor.scores(texts)  # reordered by length inside, back in input order outside
    torch.testing.assert_close(scores, trained_scores, rtol=0, atol=1e-4)
    predictions = predictor.predict(texts)
    assert [p.category for p in predictions] == [LABELS[i] for i in trained_scores.argmax(-1).tolist()]
    for p in predictions:
        assert_distribution(p.probs)


def test_long_abstracts_are_shortened_as_in_training(trained, cache_dir):
    run, _ = trained
    predictor = Predictor.from_export(run / "export", cache_dir, torch.device("cpu"))
    (prediction,) = predictor.predict([Row({"title": "A title", "abstract": "robot " * 2000})])
    assert prediction.truncated and prediction.category in LABELS
    ((ids, truncated),) = predictor.formatter.fit_prompts([{"title": "A title", "abstract": "robot " * 2000}])
    assert truncated and len(ids) + max(map(len, predictor.formatter.answer_ids)) <= predictor.formatter.max_length


# ---------------------------------------------------------------------------------------------------- batch


def test_batch_file_mixes_text_and_ids_and_marks_unknown_ids(trained, api, cache_dir, tmp_path):
    run, _ = trained
    papers = tmp_path / "papers.jsonl"
    rows = [
        {"id": "own-1", "title": VISION.title, "abstract": VISION.abstract, "primary_category": "cs.CV"},
        {"id": "2403.00010"},  # fetched
        {"arxiv_id": "2403.99999"},  # unknown to arXiv
    ]
    papers.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    shown = []
    with pytest.raises(UserError, match=r"1 of 3 rows in .*papers.jsonl could not be predicted"):
        predict(predict_cfg([f"ckpt={run}", f"input={papers}"], cache_dir, api.url), emit=shown.append)
    out = read_jsonl(tmp_path / "papers.predictions.jsonl")
    assert [r.get("id") for r in out] == ["own-1", "2403.00010", "2403.99999"]
    assert out[0]["true"] == "cs.CV" and out[0]["label"] in LABELS and out[1]["title"] == ROBOT.title
    for r in out[:2]:
        assert_distribution(r["probs"])
    assert out[2] == {"where": f"{papers}:3", "id": "2403.99999", "error": "arXiv has no paper with id 2403.99999"}
    assert [q["id_list"] for q in api.requests] == ["2403.00010,2403.99999"]  # one request for all ids
    assert shown[0] == f"accuracy on 1 labelled rows: {float(out[0]['label'] == 'cs.CV'):.3f}"


def test_batch_file_problems_name_the_line(trained, cache_dir, tmp_path):
    run, _ = trained
    papers = tmp_path / "papers.jsonl"
    papers.write_text(json.dumps({"title": "only a title"}) + "\n")
    with pytest.raises(UserError, match=r"papers.jsonl:1: needs `title`, `abstract` .*, or an arXiv `id`"):
        predict(predict_cfg([f"ckpt={run}", f"input={papers}"], cache_dir, ""))
    papers.write_text('{"title": "x", "abstract": "y"}\n{"title": \n')
    with pytest.raises(UserError, match=r"papers.jsonl:2: malformed JSON"):
        predict(predict_cfg([f"ckpt={run}", f"input={papers}"], cache_dir, ""))


# ------------------------------------------------------------------------------------------------ zero-shot


def test_zero_shot_base_model_predicts_over_the_given_labels_and_differs_from_the_fine_tuned(
    trained, cache_dir, tmp_path
):
    run, _ = trained
    text = [f"title='{ROBOT.title}'", f"abstract='{ROBOT.abstract}'"]
    zero_cfg = predict_cfg(["ckpt=null", "model=tiny_random", f"labels=[{','.join(LABELS)}]", *text], cache_dir, "")
    (zero,) = predict(zero_cfg, emit=lambda _: None)
    (tuned,) = predict(predict_cfg([f"ckpt={run}", *text], cache_dir, ""), emit=lambda _: None)
    assert_distribution(zero.probs)
    assert max(abs(zero.probs[k] - tuned.probs[k]) for k in LABELS) > 1e-3


def test_find_export_accepts_the_run_folder_and_explains_a_ckpt_file(trained, tmp_path):
    run, _ = trained
    assert find_export(run) == find_export(run / "export") == run / "export"
    with pytest.raises(UserError, match="use the export folder of that run instead"):
        find_export(run / "checkpoints" / "last.ckpt")


def test_scores_use_the_precision_the_run_was_trained_with(trained, cache_dir):
    run, objects = trained
    dm = objects["datamodule"]
    texts = [Row(r.fields, r.id) for r in dm.splits["test"][:4]]
    fp32 = Predictor.from_export(run / "export", cache_dir, torch.device("cpu"))
    assert fp32.precision == "32-true"  # as the run was trained
    bf16 = Predictor.from_export(run / "export", cache_dir, torch.device("cpu"), precision="bf16-mixed")
    prompts = [ids for ids, _ in bf16.formatter.fit_prompts([t.fields for t in texts])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = rank_scores(bf16.causal_lm, prompts, bf16.formatter.answer_ids, bf16.formatter.opening_ids)
    assert torch.equal(bf16.scores(texts)[0], expected)
    assert not torch.equal(fp32.scores(texts)[0], expected)


def test_an_export_from_before_configurable_tasks_still_predicts_and_evaluates(trained, cache_dir, tmp_path):
    """Exports written before the task moved into `data.prompt` (arXiv only: no task keys in formatting.json, a
    data config naming `ArxivDataModule`) load as the arXiv task they were trained on."""
    import shutil

    from omegaconf import OmegaConf

    from lmtune.artifacts.export import read_formatting, task_data_config
    from lmtune.commands.eval import _loaded_datamodule

    run, objects = trained
    old = tmp_path / "old-export"
    shutil.copytree(run / "export", old)
    formatting = json.loads((old / "formatting.json").read_text())
    for key in ("truncate_column", "label_column", "label_is_list", "id_column"):
        del formatting[key]
    (old / "formatting.json").write_text(json.dumps(formatting))
    cfg = OmegaConf.load(old / "config.yaml")
    cfg.data._target_ = "lmtune.data.datamodule.ArxivDataModule"
    for key in ("prompt", "label_column", "label_is_list", "id_column", "truncate_column"):
        del cfg.data[key]
    OmegaConf.save(cfg, old / "config.yaml")

    predictor = Predictor.from_export(old, cache_dir, torch.device("cpu"))
    assert predictor.formatter.truncate_column == "abstract" and predictor.formatter.columns == ("title", "abstract")
    rows = [Row(r.fields, r.id) for r in objects["datamodule"].splits["test"][:3]]
    new = Predictor.from_export(run / "export", cache_dir, torch.device("cpu"))
    assert torch.equal(predictor.scores(rows)[0], new.scores(rows)[0])
    dm = _loaded_datamodule(task_data_config(OmegaConf.load(old / "config.yaml").data, read_formatting(old)))
    assert [r.id for r in dm.splits["test"]] == [r.id for r in objects["datamodule"].splits["test"]]


def test_an_export_travels_it_names_its_base_portably_and_loads_from_a_copy(trained, tmp_path, cache_dir):
    """Copied to another machine (here: another folder, the training folder of the base gone), the export loads:
    from the base its config names (the tiny model is rebuilt), or from `base=`; its scores do not change."""
    run, objects = trained
    rows = [Row(r.fields, r.id) for r in objects["datamodule"].splits["test"][:4]]
    here = Predictor.from_export(run / "export", cache_dir, torch.device("cpu")).predict(rows)
    copy = shutil.copytree(run / "export", tmp_path / "elsewhere" / "export")
    formatting = json.loads((copy / "formatting.json").read_text())
    adapter_config = json.loads((copy / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == formatting["base_model"]  # the smoke model: its folder
    assert formatting["base_model_local"] == str(objects["module"].hparams.pretrained)
    formatting["base_model_local"] = str(tmp_path / "the-training-machine" / "model")  # not on this machine
    (copy / "formatting.json").write_text(json.dumps(formatting))
    base_copy = shutil.copytree(formatting["base_model"], tmp_path / "my-base")
    for base in (None, str(base_copy)):
        there = Predictor.from_export(copy, tmp_path / "empty-cache", torch.device("cpu"), base=base).predict(rows)
        for a, b in zip(there, here, strict=True):
            assert a.probs == pytest.approx(b.probs)


def test_exports_name_a_hub_id_as_their_base_where_there_is_one(tmp_path):
    from lmtune.artifacts.export import base_model_reference

    folder = str(tmp_path)  # a local folder the base was loaded from
    gguf = compose_train(["model=smollm2_135m"], tmp_path, tmp_path).model
    assert base_model_reference(gguf, folder) == ("HuggingFaceTB/SmolLM2-135M-Instruct", folder)
    qwen = compose_train(["model=qwen2_5_0_5b"], tmp_path, tmp_path).model
    assert base_model_reference(qwen, "Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    mine = compose_train(["model=qwen2_5_0_5b", f"model.name_or_path={folder}"], tmp_path, tmp_path).model
    assert base_model_reference(mine, folder) == (folder, folder)  # no hub id known: the folder, with a warning
    mine.hub_id = "me/my-qwen"
    assert base_model_reference(mine, folder) == ("me/my-qwen", folder)
