"""How precision is picked: what the machine can do, decided once at start-up, and the precision to compute in.

`trainer.precision=auto` (every preset's default) resolves to the fastest precision that trains correctly
on the devices at hand:
- CUDA: `bf16-mixed` where the GPU computes bf16 (Ampere and newer), else `16-mixed`;
- CPU: `bf16-mixed` only where the CPU has native bf16 instructions (AMX, AVX512-BF16, Arm BF16), else
  `32-true`. Without them bf16 runs emulated (measured on an AVX2 EPYC: a bf16 matrix product 5x slower than
  fp32, a bf16-mixed training step 10x slower). Where the flags leave doubt (oneDNN claims bf16 support but
  no native instruction is listed), a short measurement of a model-shaped matrix product in each dtype
  decides; it is cached per machine.
An explicit `trainer.precision=...` is never changed. `model.dtype=auto` then stores the frozen base in the
compute dtype (bf16 under bf16-mixed) when only adapters train, so autocast does not re-cast every frozen
weight at every use; trainable weights stay fp32.

`compile=auto` (the default) compiles each decoder layer where that was measured to pay for its compilation:
a run on the CPU, long enough (`COMPILE_MIN_STEPS`), with a C++ compiler for Inductor, on one process, without
4-bit weights or activation checkpointing. Everywhere else it stays eager until measured there (bench/README.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmtune.core.errors import UserError

log = logging.getLogger(__name__)

AUTO = "auto"
# x86 flags in /proc/cpuinfo and Arm features that mean bf16 matrix products run in hardware
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# the doubt-resolving measurement: one SmolLM2 MLP projection at a CPU batch's token count (8 x 300)
PROBE_SHAPE = (2400, 576, 1536)
PROBE_SECONDS = 0.4  # per dtype, so the whole measurement stays under a second
# compile=auto: the fewest optimizer steps over which compiling the decoder layers pays for its compilation
COMPILE_MIN_STEPS = 100


@dataclass
class Hardware:
    """The devices a run computes on, as far as choosing a precision needs to know them."""

    device: str  # cpu | cuda
    name: str  # CPU model or GPU name
    capability: str  # torch's CPU capability (AVX2, AVX512, ...) or the CUDA compute capability (sm_90)
    native_bf16: bool  # bf16 in hardware: AMX/AVX512-BF16/Arm BF16 flags, or a CUDA bf16 GPU
    bf16_supported: bool  # bf16 runs at all (oneDNN on CPU, emulated or not)
    threads: int = 1
    measured: dict = field(default_factory=dict)  # GFLOP/s of the probe product per dtype, when measured

    def describe(self) -> str:
        text = f"{self.device}: {self.name}, {self.capability}, native bf16 {'yes' if self.native_bf16 else 'no'}"
        if self.measured:
            text += ", measured " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in self.measured.items())
        return text

    def as_dict(self) -> dict:
        return {f"hardware/{k}": v for k, v in asdict(self).items()}


def _cpu_flags_and_model() -> tuple[set[str], str]:
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key == "model name" and value.strip():
                model = value.strip()
    except OSError:
        pass
    return flags, model


def cpu_hardware() -> Hardware:
    flags, model = _cpu_flags_and_model()
    mkldnn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return Hardware(
        device="cpu",
        name=model,
        capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=any(f in flags for f in NATIVE_BF16_FLAGS),
        bf16_supported=bool(mkldnn()) if mkldnn else False,
        threads=torch.get_num_threads(),
    )


def cuda_hardware(index: int = 0) -> Hardware:
    major, minor = torch.cuda.get_device_capability(index)
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return Hardware("cuda", torch.cuda.get_device_name(index), f"sm_{major}{minor}", bf16, bf16)


def on_cuda(accelerator: str) -> bool:
    accelerator = str(accelerator or AUTO)
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == AUTO and torch.cuda.is_available()


def choose_precision(hw: Hardware, measure: Callable[[], dict] | None = None) -> tuple[str, str]:
    """(precision, why) for `hw`; `measure()` -> {"fp32": GFLOP/s, "bf16": GFLOP/s} settles the doubtful case."""
    if hw.device == "cuda":
        if hw.native_bf16:
            return "bf16-mixed", "the GPU computes bf16"
        return "16-mixed", "the GPU has no bf16; fp16 autocast with loss scaling"
    if hw.native_bf16:
        return "bf16-mixed", "the CPU has native bf16 (AMX/AVX512-BF16)"
    if not hw.bf16_supported:
        return "32-true", "the CPU has no bf16 support"
    if measure is None:
        return "32-true", "no native bf16 instruction listed and nothing measured"
    hw.measured = measure()
    if hw.measured["bf16"] > 1.1 * hw.measured["fp32"]:
        return "bf16-mixed", "no native bf16 flag, but bf16 measured faster than fp32"
    return "32-true", "no native bf16 instruction; bf16 measured no faster than fp32 (emulated)"


def random_operands(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Random matrices from a private generator: a measurement (cached on one run, skipped on the next) must not
    move the global RNG, or the adapters' initialization would depend on whether the cache existed."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]


def measured_rate(fn, flops: float, seconds: float) -> float:
    fn()  # warm-up: kernel selection, weight packing
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - start) / 1e9


def measure_probe(shape: tuple[int, int, int] = PROBE_SHAPE, seconds: float = PROBE_SECONDS) -> dict:
    """GFLOP/s of `F.linear` at a model's layer shape: fp32, and fp32 weights under bf16 autocast (what
    `bf16-mixed` does)."""
    m, k, n = shape
    x, w = random_operands((m, k), (n, k))
    flops = 2 * m * k * n

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, w)

    with torch.no_grad():
        return {
            "fp32": round(measured_rate(lambda: torch.nn.functional.linear(x, w), flops, seconds), 1),
            "bf16": round(measured_rate(bf16, flops, seconds), 1),
        }


def cached_measurement(
    cache_dir: str | Path | None, what: str, hw: Hardware, measure: Callable[[], dict]
) -> Callable[[], dict]:
    """`measure`, remembered per machine (CPU model, capability, threads, torch version) under cache_dir."""
    if cache_dir is None:
        return measure
    key = hashlib.sha256(f"{hw.name}|{hw.capability}|{hw.threads}|{torch.__version__}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / "hardware" / f"{what}-{key}.json"

    def cached() -> dict:
        if path.is_file():
            return json.loads(path.read_text())
        rates = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rates))
        os.replace(tmp, path)
        return rates

    return cached


def current_hardware(accelerator: str = AUTO) -> Hardware:
    if not on_cuda(accelerator):
        return cpu_hardware()
    if not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use trainer=cpu, or check CUDA_VISIBLE_DEVICES and the driver."
        )
    return cuda_hardware()


def resolve_precision(
    requested, accelerator: str = AUTO, cache_dir=None, hardware: Hardware | None = None, measure=measure_probe
) -> tuple[str, Hardware, str]:
    """(precision, hardware, why). An explicit `requested` is returned as given; `auto` is decided here.
    `hardware` and `measure` default to this machine (tests pass others)."""
    hw = hardware or current_hardware(accelerator)
    if str(requested) != AUTO:
        return str(requested), hw, "set explicitly"
    precision, why = choose_precision(hw, cached_measurement(cache_dir, "bf16-probe", hw, measure))
    return precision, hw, why


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use on the CPU (`CXX`, else the usual names), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def choose_compile(
    requested, hw: Hardware, *, max_steps: int, quantized: bool, strategy: str, checkpointing
) -> tuple[bool, str]:
    """(compile, why) for `compile=auto`; an explicit true/false is returned as given."""
    if str(requested) != AUTO:
        return bool(requested), "set explicitly"
    reasons = [
        (hw.device != "cpu", "not yet measured on CUDA"),
        (quantized, "not measured with 4-bit weights"),
        (strategy != "single", "not measured with several processes"),
        (bool(checkpointing), "not measured with activation checkpointing"),
        (max_steps < 0, "trainer.max_steps is not set: the run's length in steps is not known (set compile=true)"),
        (max_steps < COMPILE_MIN_STEPS, f"trainer.max_steps={max_steps} is under {COMPILE_MIN_STEPS}: too short"),
        (cpp_compiler() is None, "no C++ compiler for Inductor (set CXX or install g++)"),
    ]
    for applies, why in reasons:
        if applies:
            return False, why
    return True, f"a CPU run of {max_steps} steps: fused elementwise work pays back the compilation"


def compute_dtype_name(precision: str) -> str:
    return {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(str(precision), "float32")


def autocast_for(model: torch.nn.Module, precision: str | None):
    """The trainer's autocast for inference outside the Trainer: a model validated under bf16 autocast is
    scored and generates under it too, so eval, predict and the server reproduce what training reported."""
    device = next(model.parameters()).device
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def frozen_dtype(requested, precision: str, adapter_kind: str) -> str:
    """`model.dtype`: explicit values win; `auto` stores the frozen base in the compute dtype when only adapters
    train (a full fine-tune keeps fp32 master weights)."""
    if str(requested) != AUTO:
        return str(requested)
    return compute_dtype_name(precision) if adapter_kind == "lora" else "float32"
