"""The benchmark scripts, in their smoke form (tiny model, sample data), so they cannot rot; and the pieces the
benchmark's fairness rests on: the baseline trains on the same objective, the clock and the FLOP count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, SAMPLE, arxiv_formatter, arxiv_spec

sys.path.insert(0, str(ROOT / "bench"))

from clock import StepClock  # noqa: E402
from hf_baseline import padded_to  # noqa: E402

from lmtune.data.batching import PaddingCollator  # noqa: E402
from lmtune.data.records import SkipCounts, read_records  # noqa: E402
from lmtune.model.loss import masked_lm_loss_sum  # noqa: E402

SMOKE_MAX_LENGTH, SMOKE_BATCH = 256, 8  # conf/experiment/smoke.yaml


def run_bench(cache_dir, *args: str) -> None:
    """`python bench/run.py --smoke <args>` with the session's model cache and W&B offline; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LMTUNE_CACHE": str(cache_dir), "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke_bench(tmp_path_factory, cache_dir):
    """`bench/run.py --smoke` once: every part, one run each, on the tiny model and the sample data."""
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text("# Benchmarks\n\nintro kept\n\n<!-- results:start -->\nold table\n<!-- results:end -->\nkept\n")
    run_bench(
        cache_dir,
        "--runs",
        "1",
        "--steps",
        "4",
        "--out",
        str(out),
        "--readme",
        str(readme),
        "--work",
        str(out / "work"),
    )
    (result,) = out.glob("*.json")
    return json.loads(result.read_text()), readme.read_text()


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_training_benchmark_measures_both_sides_with_their_own_padding(smoke_bench):
    results, _ = smoke_bench
    for adapter in ("lora", "qlora"):
        r = results["train"]["results"][adapter]
        ours, base = r["ours"]["runs"][0], r["baseline"]["runs"][0]
        assert ours["timed_steps"] == base["timed_steps"] == 4 - 2  # warm-up left out on both sides
        # the baseline pads every batch to max_length; ours only to the batch's longest example
        assert base["padded_tokens"] == base["timed_steps"] * SMOKE_BATCH * SMOKE_MAX_LENGTH
        assert ours["padding_fraction"] < base["padding_fraction"]
        assert ours["params/total"] == base["params/total"] and ours["params/trainable"] == base["params/trainable"]
        assert r["tokens_per_s_ratio"] == pytest.approx(r["ours"]["tokens_per_s"] / r["baseline"]["tokens_per_s"])
        # the training-phase peak (VmHWM after a reset) is within the whole process's peak (getrusage; both KiB)
        assert ours["train_peak_rss_mb"] is not None and ours["train_peak_rss_mb"] <= ours["process_peak_rss_mb"] + 1
        # both sides credited with the same FLOPs per token; MFU and the model-shaped share from this machine's
        # roofline, measured in the runs' compute dtype at our batches' token count
        lim = r["limits"]
        assert ours["flops_per_token"] == base["flops_per_token"] > 0 and ours["precision"] == base["precision"]
        assert lim["dtype"] == {"bf16-mixed": "bfloat16"}.get(ours["precision"], "float32")
        assert ours["useful_gflops"] == pytest.approx(ours["flops_per_token"] * ours["tokens_per_s"] / 1e9)
        assert ours["mfu"] == pytest.approx(ours["useful_gflops"] / lim["peak_gflops"])
        assert ours["roofline_fraction"] == pytest.approx(ours["useful_gflops"] / lim["model_shaped_gflops"])
        assert lim["tokens"] == round(ours["padded_tokens"] / ours["timed_steps"])
    # QLoRA stores the same weights in 4 bits: the same parameter counts as LoRA, not the packed storage's
    lora, qlora = (results["train"]["results"][a]["ours"] for a in ("lora", "qlora"))
    assert (qlora["params/total"], qlora["params/trainable"]) == (lora["params/total"], lora["params/trainable"])


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_accuracy_benchmark_compares_on_one_test_split(smoke_bench):
    results, _ = smoke_bench
    acc = results["accuracy"]
    rows = acc["rows"]
    assert len({row["n"] for row in rows.values()}) == 1  # every model scored on the same test papers
    assert rows["finetuned"]["n"] == acc["budget"]["test_examples"]
    assert rows["tfidf_same"]["train_examples"] == acc["budget"]["train_examples"]
    assert rows["tfidf_all"]["train_examples"] >= rows["tfidf_same"]["train_examples"]
    assert acc["targets"]["beats_tfidf_same"] == (rows["finetuned"]["acc"] > rows["tfidf_same"]["acc"])


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_eval_benchmark_rank_scoring_matches_the_naive_reference(smoke_bench):
    ev = smoke_bench[0]["eval"]
    assert ev["examples"] == 8
    assert ev["naive_rank"]["same_labels"] == 1.0  # fp32 tiny model: the cached scoring picks the naive labels
    assert ev["rank_over_generate"] == pytest.approx(ev["rank"]["examples_per_s"] / ev["generate"]["examples_per_s"])
    assert 0.0 <= ev["agreement"] <= 1.0


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_data_benchmark_prepares_every_row_of_each_size_twice(smoke_bench):
    sizes = smoke_bench[0]["data"]["sizes"]
    assert [s["rows"] for s in sizes] == [192, 288]  # the 96-row sample, 2 and 3 copies with new ids
    for size in sizes:
        first, second = size["first"], size["second"]
        assert first["records"] == second["records"] == size["rows"]  # every copy kept: its ids are new
        assert first["examples"] == second["examples"] and 0 < sum(first["examples"].values()) <= size["rows"]
        assert first["peak_rss_mb"] > 0 and size["ms_per_row_per_core"] > 0
        assert first["new_cache_files"] == 4 and second["new_cache_files"] == 0  # records + 3 splits; then reused


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_data_benchmark_trains_at_each_length_on_examples_that_fill_it(smoke_bench):
    runs = smoke_bench[0]["data"]["lengths"]["lengths"]
    assert [r["max_length"] for r in runs] == [128, 192]
    assert all(r["tokens_per_s"] > 0 and r["padding_fraction"] < 0.2 for r in runs)


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_results_table_replaces_only_its_section(smoke_bench):
    results, readme = smoke_bench
    assert readme.startswith("# Benchmarks\n\nintro kept\n") and readme.endswith("<!-- results:end -->\nkept\n")
    assert "old table" not in readme
    assert (
        f"| lora | **ours / baseline** | **{results['train']['results']['lora']['tokens_per_s_ratio']:.3g}x**" in readme
    )
    if not torch.cuda.is_available():
        assert "Not measured: no CUDA device on this machine." in readme  # never a guess


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_batch_invariance_script_finds_a_paper_scored_the_same_alone_and_among_others(tmp_path, cache_dir):
    from conftest import compose_train
    from lmtune.training.train import train

    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=2", "report.enabled=false"]
    train(compose_train([*overrides, "trainer.precision=bf16-mixed"], tmp_path / "run", cache_dir))
    script = [sys.executable, str(ROOT / "bench" / "batch_invariance.py"), "--ckpt", str(tmp_path / "run" / "export")]
    proc = subprocess.run(
        [*script, "--data", str(SAMPLE), "--limit", "10"],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LMTUNE_CACHE": str(cache_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["papers"] == 10 and result["precision"] == "bf16-mixed" and result["together_papers_per_s"] > 0
    assert result["together_max_prob_diff_vs_alone"] == result["reversed_groups_of_8_max_prob_diff_vs_alone"] == 0


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_profile_script_runs(cache_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--steps", "1", "experiment=smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LMTUNE_CACHE": str(cache_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours" in proc.stdout and "baseline" in proc.stdout and "aten::" in proc.stdout


def test_baseline_fixed_padding_trains_on_the_same_objective(tiny_dir, tiny_tokenizer):
    """Fixed-length padding + HF's full-logit loss = our dynamic padding + supervised-position loss: the
    benchmark compares the cost of one objective, not two objectives."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    records = read_records(SAMPLE, SkipCounts(), arxiv_spec())[:4]
    formatter = arxiv_formatter(tiny_tokenizer, sorted({r.label for r in records}), max_length=256)
    examples = formatter.format(records)
    pad_id = tiny_tokenizer.pad_token_id

    fixed = padded_to(examples, 256, pad_id)
    batch = {k: torch.tensor([row[k] for row in fixed]) for k in fixed[0]}
    assert batch["input_ids"].shape == (4, 256)
    hf_loss = model(**batch).loss

    dynamic = PaddingCollator(pad_id)(examples)
    assert dynamic["input_ids"].shape[1] == max(len(e.input_ids) for e in examples) < 256
    hidden = model.model(input_ids=dynamic["input_ids"], attention_mask=dynamic["attention_mask"]).last_hidden_state
    loss_sum, n = masked_lm_loss_sum(hidden, dynamic["labels"], model.lm_head)
    torch.testing.assert_close(loss_sum / n, hf_loss, rtol=0, atol=1e-5)


def test_step_clock_leaves_out_warmup_steps(monkeypatch):
    times = iter([10.0, 12.0, 13.0, 15.0])
    monkeypatch.setattr("clock.time.perf_counter", lambda: next(times))
    clock = StepClock(warmup_steps=2)
    clock.start(torch.device("cpu"))
    for real, padded in [(100, 128), (50, 64), (30, 32), (70, 96)]:
        clock.step(real, padded)
    r = clock.result()
    # timed: steps 3 and 4, from the end of step 2 (t=12) to the end of step 4 (t=15)
    assert (r["timed_steps"], r["tokens"], r["padded_tokens"], r["seconds"]) == (2, 100, 128, 3.0)
    assert r["tokens_per_s"] == pytest.approx(100 / 3) and r["steps_per_s"] == pytest.approx(2 / 3)


def test_flops_count_frozen_weights_at_four_per_token_and_leave_the_embedding_out(tiny_dir):
    from peft import LoraConfig, get_peft_model

    from lmtune.model.module import training_flops_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    embedding = model.get_input_embeddings().weight.numel() + (
        0 if model.config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    )
    body = sum(p.numel() for p in model.parameters()) - embedding
    assert training_flops_per_token(model) == 6 * body  # full fine-tuning: the usual 6·N
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert training_flops_per_token(lora) == 4 * body + 6 * adapter  # no weight gradients for the frozen base


def test_gpu_preset_is_llama_3_2_1b_shaped(tiny_tokenizer):
    """The GPU benchmark's random model has exactly Llama-3.2-1B's parameters (built on the meta device)."""
    from common import project_config
    from train_throughput import PRESETS

    from lmtune.model.loading import model_source
    from lmtune.model.tiny import build_tiny_model

    cfg = project_config("train", [*PRESETS["gpu"], "adapter=qlora"])
    assert (cfg.trainer.precision, cfg.data.max_length, model_source(cfg.model)) == ("auto", 512, "tiny_random")
    with torch.device("meta"):
        model = build_tiny_model(tiny_tokenizer, **cfg.model.tiny)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # meta-llama/Llama-3.2-1B
    assert model.config.tie_word_embeddings and model.config.vocab_size == 128_256


@pytest.mark.slow  # a minute: the curve's points trained, resumed and plotted
def test_learning_curve_smoke_form_builds_points_resumes_and_plots(tmp_path, cache_dir):
    """`make bench ARGS="--parts curve"` in its smoke form: each point is one printed user command; a rerun with
    more sizes keeps the points already measured (a long curve is built over several sessions)."""

    import learning_curve

    run_bench(cache_dir, "--parts", "curve", "--out", str(tmp_path), "--work", str(tmp_path / "work"))
    (path,) = tmp_path.glob("*-curve.json")
    first = json.loads(path.read_text())
    assert [p["n"] for p in first["points"]] == [8, 16]
    for point in first["points"]:
        assert point["command"].startswith(f"python src/train.py experiment=smoke data.limit_train={point['n']} ")
        assert point["train_examples"] == point["n"] and point["lm"]["steps"] == point["n"] // 8
        # the LM, TF-IDF on the same papers and the zero-shot model on one test split
        assert point["lm"]["n"] == point["tfidf_same"]["n"] == point["zero_shot"]["n"] == first["tfidf_all"]["n"]
        assert point["train_seconds"] > 0 and point["train_tokens"] > 0
    assert first["tfidf_all"]["train_examples"] > 16
    assert first["points"][0]["zero_shot"]["acc"] == first["points"][1]["zero_shot"]["acc"]  # one model, one split
    for plot in first["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log_of_8 = tmp_path / "work" / Path(first["file"]).stem / "n8" / "log.txt"
    measured = log_of_8.stat().st_mtime_ns
    # a rerun measures nothing twice: the same points come back without a training run
    again = learning_curve.main(
        learning_curve.parse(["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    )
    assert again["points"] == first["points"] and log_of_8.stat().st_mtime_ns == measured

    # a step floor (the recipe's own budget for lora_arxiv) gives a small N more passes; its own file
    floor = learning_curve.main(
        learning_curve.parse(["--smoke", "--sizes", "8", "--min-steps", "2", "--tag", "floor", "--out", str(tmp_path),
                              "--work", str(tmp_path / "work")])
    )  # fmt: skip
    assert floor["file"].endswith("-curve-floor.json") and floor["settings"]["min_steps"] == 2
    assert floor["points"][0]["lm"]["steps"] == 2 and " trainer.max_steps=2 " in floor["points"][0]["command"]

    # recipes and machines on one plot, by training tokens: the file's own points, labelled by recipe and machine
    plot, (series,) = learning_curve.compare([path], tmp_path / "compare.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(p["n"], p["tokens"], p["acc"]) for p in series["points"]] == [
        (p["n"], p["train_tokens"], p["lm"]["acc"]) for p in first["points"]
    ]
    machine, precision = first["machine"], first["points"][0]["precision"]
    assert series["label"] == f"smoke: {machine['cpu']} ({machine['cpu_capability']}), {precision}"
    (tmp_path / "not-a-curve.json").write_text('{"points": 3}')
    with pytest.raises(SystemExit, match="not-a-curve.json is not a learning-curve results file"):
        learning_curve.compare([path, tmp_path / "not-a-curve.json"], tmp_path / "bad.png")


@pytest.mark.slow  # bench/run.py --smoke: every part, about 4 minutes
def test_serve_benchmark_loads_the_server_beside_the_offline_rate(smoke_bench):
    serve = smoke_bench[0]["serve"]
    assert serve["offline_rows_per_s"] > 0 and serve["exit_code_after_sigterm"] == 0
    assert [r["concurrency"] for r in serve["levels"]] == [1, 8]
    for level in serve["levels"]:  # bad requests mixed in: each got its 4xx, no good one an error
        assert level["errors"] == 0 and level["bad_requests"] >= 1 and level["bad_not_4xx"] == 0
        assert level["requests"] + level["bad_requests"] >= 16 and level["requests_per_s"] > 0
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    soak = serve["soak"]
    assert soak["errors"] == 0 and soak["requests"] > 0 and soak["rss_mb"] and soak["bad_not_4xx"] == 0


@pytest.mark.slow  # two tiny training runs with their generation reports: about half a minute
def test_generate_curve_smoke_form_keeps_points_and_caches_the_zero_shot_answers(tmp_path):
    """`bench/generate_curve.py --smoke`: each point is one printed user command; the zero-shot answers are written
    once for the curve (the same test split); a rerun keeps the points already measured."""
    import generate_curve

    args = ["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    doc = generate_curve.main(generate_curve.parse([*args, "--sizes", "20", "40"]))
    assert [p["limit_train"] for p in doc["points"]] == [20, 40]
    assert all(p["command"].startswith("python src/train.py experiment=arxiv_titles") for p in doc["points"])
    first, second = doc["points"]
    assert first["zero_shot/chrf"] == second["zero_shot/chrf"] and first["general_text/base_loss"] > 0
    again = generate_curve.main(generate_curve.parse([*args, "--sizes", "20", "40"]))
    assert again["points"] == doc["points"]  # nothing trained again


@pytest.mark.slow  # eight tiny training runs: about a minute
def test_packing_benchmark_measures_every_setting_with_the_same_examples(tmp_path):
    """`bench/packing.py --smoke`: four settings, the same command but for packing and length grouping; packed
    rows carry less padding than unpacked random batches."""
    import packing

    result = packing.main(
        packing.parse(["--smoke", "--steps", "4", "--runs", "1", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
    )
    runs = {name: r[0] for name, r in result["runs"].items()}
    assert set(runs) == set(packing.SETTINGS) and all(r["steps"] == 4 and r["tokens_per_s"] > 0 for r in runs.values())
    assert runs["packed, random batches"]["padding_fraction"] < runs["unpacked, random batches"]["padding_fraction"]
    assert result["ratio_to_default"]["unpacked, length-grouped (default)"] == 1.0


@pytest.mark.slow  # two tiny training runs and two TF-IDF fits: about half a minute
def test_trust_benchmark_measures_both_splits_from_the_runs_files(tmp_path):
    """`bench/trust.py --smoke`: a random and a time split, each one printed user command; the numbers come from the
    run's own files (intervals, calibration before and after, sets, McNemar, TF-IDF on every training row)."""
    import trust

    args = ["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    doc = trust.main(trust.parse(args))
    assert set(doc["runs"]) == {"random", "time"}
    for split, run in doc["runs"].items():
        assert run["command"].startswith(f"python src/train.py experiment=smoke logger=none data.split={split}")
        tuned = run["fine_tuned"]
        assert tuned["acc_interval"][0] <= tuned["acc"] <= tuned["acc_interval"][1]
        assert tuned["temperature"] > 0 and tuned["sets"]["target"] == 0.9 and 0 < run["vs_tfidf"]["p_value"] <= 1
        assert run["tfidf_all_training_rows"]["train_examples"] >= run["data"]["train_examples"]
    assert doc["runs"]["time"]["data"]["dates"]["train"]
    again = trust.main(trust.parse(args))
    assert again["runs"] == doc["runs"]  # nothing trained again
