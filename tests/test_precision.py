"""`trainer.precision=auto` and `model.dtype=auto`: the decision for each kind of machine (described, not needed),
an explicit value never overridden, and a bf16-stored frozen base that trains like the fp32 one."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import compose_train
from lmtune.model.precision import Hardware, choose_precision, cpu_hardware, measure_probe, resolve_precision
from lmtune.training.config import resolve_auto
from lmtune.training.throughput import peak_flops
from lmtune.training.train import train

# the machines users land on, as torch and /proc/cpuinfo describe them
EPYC_AVX2 = Hardware("cpu", "AMD EPYC 7B13", "AVX2", native_bf16=False, bf16_supported=False, threads=2)
XEON_AMX = Hardware("cpu", "Intel Xeon Platinum 8481C", "AVX512", native_bf16=True, bf16_supported=True, threads=2)
XEON_AVX512 = Hardware("cpu", "Intel Xeon Gold 6148", "AVX512", native_bf16=False, bf16_supported=True, threads=2)
H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", "sm_90", native_bf16=True, bf16_supported=True)
T4 = Hardware("cuda", "Tesla T4", "sm_75", native_bf16=False, bf16_supported=False)


def _never_measured():
    raise AssertionError("the flags were enough: nothing should be measured")


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [(EPYC_AVX2, "32-true"), (XEON_AMX, "bf16-mixed"), (H100, "bf16-mixed"), (T4, "16-mixed")],
)
def test_auto_precision_follows_the_hardware(hardware, expected):
    precision, why = choose_precision(hardware, _never_measured)
    assert precision == expected and why


def test_a_cpu_that_leaves_doubt_is_measured_once_and_the_faster_dtype_wins(tmp_path):
    calls = []

    def emulated():  # oneDNN runs bf16 without native instructions: slower than fp32
        calls.append(1)
        return {"fp32": 60.0, "bf16": 11.0}

    for _ in range(2):  # the second run reads the per-machine cache
        precision, hw, why = resolve_precision("auto", "cpu", tmp_path, Hardware(**vars(XEON_AVX512)), emulated)
        assert precision == "32-true" and "measured" in why
    assert len(calls) == 1 and hw.measured == {"fp32": 60.0, "bf16": 11.0}
    assert "measured fp32 60 GFLOP/s, bf16 11 GFLOP/s" in hw.describe()
    fast = Hardware(**{**vars(XEON_AVX512), "name": "another CPU"})  # another machine: its own measurement
    precision, _, _ = resolve_precision("auto", "cpu", tmp_path, fast, lambda: {"fp32": 60.0, "bf16": 90.0})
    assert precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("hardware", "precision", "dtype", "compute"),
    [(EPYC_AVX2, "32-true", "float32", "float32"), (XEON_AMX, "bf16-mixed", "bfloat16", "bfloat16")],
)
def test_qlora_arxiv_resolves_every_auto_for_the_machine(hardware, precision, dtype, compute, tmp_path):
    cfg = compose_train(["experiment=qlora_arxiv"], tmp_path, tmp_path)
    assert (cfg.trainer.precision, cfg.model.dtype, cfg.adapter.quantization.compute_dtype) == ("auto",) * 3
    resolve_auto(cfg, hardware, _never_measured)
    assert (cfg.trainer.precision, cfg.model.dtype, cfg.adapter.quantization.compute_dtype) == (
        precision,
        dtype,
        compute,
    )
    assert cfg.hardware.name == hardware.name and cfg.hardware.capability == hardware.capability
    assert cfg.hardware.precision_reason


@pytest.mark.parametrize(
    ("overrides", "hardware", "compiled", "reason"),
    [
        (["experiment=lora_arxiv"], XEON_AMX, True, "150 steps"),
        (["experiment=lora_arxiv"], EPYC_AVX2, True, "150 steps"),
        (["experiment=lora_arxiv"], H100, False, "CUDA"),
        (["experiment=qlora_arxiv"], XEON_AMX, False, "4-bit"),
        (["experiment=lora_arxiv", "trainer=ddp"], EPYC_AVX2, False, "several processes"),
        (["experiment=lora_arxiv", "model.gradient_checkpointing=mlp"], XEON_AMX, False, "checkpointing"),
        (["experiment=smoke"], XEON_AMX, False, "trainer.max_steps="),
        (["experiment=lora_arxiv", "trainer.max_steps=99"], XEON_AMX, False, "under 100"),
        (["experiment=lora_arxiv", "trainer.max_steps=-1", "trainer.max_epochs=3"], XEON_AMX, False, "not known"),
        (["experiment=smoke", "compile=true"], H100, True, "explicitly"),
        (["experiment=lora_arxiv", "compile=false"], XEON_AMX, False, "explicitly"),
    ],
)
def test_auto_compile_only_where_it_was_measured_to_pay(overrides, hardware, compiled, reason, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "sh")  # a compiler found whatever this machine has (the reason under test is another)
    cfg = compose_train(overrides, tmp_path, tmp_path)
    resolve_auto(cfg, hardware, _never_measured)
    assert cfg.compile is compiled and reason in cfg.hardware.compile_reason


def test_auto_compile_stays_eager_without_a_cpp_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, clang++ or c++ on it
    monkeypatch.delenv("CXX", raising=False)
    cfg = compose_train(["experiment=lora_arxiv"], tmp_path, tmp_path)
    resolve_auto(cfg, XEON_AMX, _never_measured)
    assert cfg.compile is False and "C++ compiler" in cfg.hardware.compile_reason


def test_explicit_settings_are_never_overridden(tmp_path):
    cfg = compose_train(
        ["experiment=lora_arxiv", "trainer.precision=32-true", "model.dtype=float32"], tmp_path, tmp_path
    )
    resolve_auto(cfg, XEON_AMX, _never_measured)
    assert (cfg.trainer.precision, cfg.model.dtype) == ("32-true", "float32")
    cfg = compose_train(["experiment=lora_arxiv", "trainer.precision=bf16-mixed"], tmp_path, tmp_path)
    resolve_auto(cfg, EPYC_AVX2, _never_measured)  # slow there, but asked for
    assert (cfg.trainer.precision, cfg.model.dtype) == ("bf16-mixed", "bfloat16")


def test_full_fine_tuning_keeps_fp32_weights_under_bf16(tmp_path):
    cfg = compose_train(["experiment=smoke", "adapter=none"], tmp_path, tmp_path)
    resolve_auto(cfg, XEON_AMX, _never_measured)
    assert (cfg.trainer.precision, cfg.model.dtype) == ("bf16-mixed", "float32")  # trained weights stay fp32


def test_every_shipped_preset_defaults_to_auto(tmp_path):
    for overrides in (
        ["experiment=lora_arxiv"],
        ["experiment=smoke"],
        *[[f"trainer={t}"] for t in ("gpu", "ddp", "fsdp")],
    ):
        cfg = compose_train(overrides, tmp_path, tmp_path)
        assert cfg.trainer.precision == "auto" and cfg.model.dtype == "auto", overrides
        assert cfg.adapter.dropout == 0.0


def test_this_machine_is_described_and_its_probe_measures_both_dtypes():
    hw = cpu_hardware()
    assert hw.device == "cpu" and hw.name and hw.capability == torch.backends.cpu.get_cpu_capability()
    rates = measure_probe((256, 128, 128), seconds=0.02)
    assert rates["fp32"] > 0 and rates["bf16"] > 0


def test_measuring_the_machine_leaves_the_global_rng_alone(tmp_path):
    """The peak is measured on a run's first start and read from the cache after: if the measurement drew from
    the global RNG, the adapters' initialization (and so every result) would depend on the cache."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    measure_probe((64, 32, 32), seconds=0.01)
    assert peak_flops(torch.device("cpu"), "32-true", tmp_path) > 0  # measured: nothing cached yet
    assert torch.equal(torch.rand(4), expected)


def test_a_bf16_stored_base_trains_like_the_fp32_one(tmp_path, cache_dir):
    """Same loss within bf16 tolerance; adapters stay fp32 (in memory, checkpoint and export); the record says
    which precision and dtype the run resolved to."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = compose_train(
            ["experiment=smoke", "logger=none", "trainer.precision=bf16-mixed", f"model.dtype={dtype}"]
            + ["trainer.max_steps=4", "report.enabled=false"],
            tmp_path / dtype,
            cache_dir,
        )
        metrics, objects = train(cfg)
        module = objects["module"]
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        frozen = [p for p in module.parameters() if not p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
        assert {p.dtype for p in frozen} == {getattr(torch, dtype)}
        ckpt = torch.load(tmp_path / dtype / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        assert set(ckpt) == set(trainable) and all(v.dtype == torch.float32 for v in ckpt.values())
        with safe_open(tmp_path / dtype / "export" / "adapter_model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
        summary = json.loads((tmp_path / dtype / "metrics.json").read_text())
        assert summary["precision"] == "bf16-mixed" and summary["hardware"]["device"] == "cpu"
        exported = yaml.safe_load((tmp_path / dtype / "export" / "config.yaml").read_text())
        assert (exported["trainer"]["precision"], exported["model"]["dtype"]) == ("bf16-mixed", dtype)
        assert exported["hardware"]["name"] == summary["hardware"]["name"]
        runs[dtype] = metrics
    assert runs["bfloat16"]["val/loss"] == pytest.approx(runs["float32"]["val/loss"], rel=2e-2)
