#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine with torch, lightning, transformers, peft and
# torchmetrics in its image but no package registry (see the Makefile's gpu-kit target):
#   1. installs .gpu-kit/*.whl (bitsandbytes, hydra-core, omegaconf, antlr4) beside the image's torch, and puts
#      the kit's arXiv subsample where the benchmark looks for the shared data, if that is missing;
#   2. records the machine in $OUT/env.txt (nvidia-smi, versions, GPU name, bf16 support, trainer.precision=auto);
#   3. runs the GPU tests (tests/test_gpu.py) -> $OUT/test_gpu.log;
#   4. runs the benchmark's GPU part (Llama-3.2-1B shape, ours vs HF Trainer + peft) and the roofline
#      -> $OUT/bench_gpu.log, $OUT/<date>-<machine>.json, $OUT/README.md.
# Everything goes under $OUT (default logs/gpu_check), at most 8 files. Steps 3 and 4 have their own time limits
# (GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S), so the script ends within 8 minutes; a failing step is recorded and
# the next one still runs. The project runs from the source tree (PYTHONPATH), it is not installed.
#   on the lent machine (device tool): carry [".gpu-kit"], command `bash bench/gpu_check.sh`
#   a check of the CPU steps anywhere:  GPU_CHECK_DRY_RUN=1 OUT=/tmp/gpucheck bash bench/gpu_check.sh
# PYTHON (default python3) is the interpreter that holds torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-logs/gpu_check}
SITE=${GPU_KIT_SITE:-/tmp/lmtune-site}
TEST_S=${GPU_CHECK_TEST_S:-240}
BENCH_S=${GPU_CHECK_BENCH_S:-200}
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT"

# 1. the kit
if ! ls .gpu-kit/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in .gpu-kit/: run 'make gpu-kit' first and carry .gpu-kit" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu-kit/*.whl
export PYTHONPATH="$SITE:$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export PROJECT_ROOT="$PWD" WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
unset WANDB_API_KEY

# bench/common.py reads the training data from ../shared/data/arxiv/arxiv_cs.jsonl, which does not travel
shared=../shared/data/arxiv/arxiv_cs.jsonl
data_note="benchmark data: $shared (present)"
if [ ! -f "$shared" ]; then
    if [ "$DRY" != "1" ] && [ -f .gpu-kit/data/arxiv_cs.jsonl ]; then
        mkdir -p "$(dirname "$shared")" && ln -sfn "$PWD/.gpu-kit/data/arxiv_cs.jsonl" "$shared"
        data_note="benchmark data: $shared -> .gpu-kit/data/arxiv_cs.jsonl (every 10th record)"
    else
        data_note="benchmark data: $shared missing (the benchmark's GPU part will fail)"
    fi
fi

# 2. the machine
set +e
{
    date -u
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    echo "$data_note"
    timeout 120 "$PYTHON" - <<'PY'
import importlib.metadata as md
import importlib.util
import platform

import torch

print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "lightning", "torchmetrics", "accelerate", "bitsandbytes",
             "hydra-core", "omegaconf", "antlr4-python3-runtime"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
# absent on the image; only needed for logger=wandb, GGUF models and the hub data source (imported lazily)
print("absent (not needed here):", [m for m in ("wandb", "gguf", "datasets") if importlib.util.find_spec(m) is None])
import bitsandbytes, hydra, omegaconf  # noqa: E401,F401  the kit imports
from lmtune.training.train import train  # noqa: F401  the project imports from the source tree
from lmtune.model.precision import resolve_precision

print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), "| bf16 supported:", torch.cuda.is_bf16_supported())
precision, hw, why = resolve_precision("auto", "auto")
print(f"trainer.precision=auto -> {precision} ({why}; {hw.describe()})")
print("imports: ok")
PY
} 2>&1 | tee "$OUT/env.txt"
env_rc=${PIPESTATUS[0]}
set -e
if [ "$env_rc" != 0 ] || ! grep -q '^imports: ok$' "$OUT/env.txt"; then
    echo "gpu check: the kit or the project does not import (see $OUT/env.txt); GPU steps not run" \
        | tee "$OUT/summary.txt"
    exit 3
fi

if [ "$DRY" = "1" ]; then
    echo "gpu check (dry run): kit installed in $SITE, imports work; GPU steps skipped; files: $(ls "$OUT" | tr '\n' ' ')" \
        | tee "$OUT/summary.txt"
    exit 0
fi

# 3. the GPU tests (they pass logger=none themselves)
set +e
timeout "$TEST_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.log"
tests=${PIPESTATUS[0]}

# 4. the benchmark's GPU part (its runs use no logger)
parts=gpu
if timeout 60 "$PYTHON" bench/run.py --help 2>/dev/null | grep -q roofline; then parts=gpu,roofline; fi
timeout "$BENCH_S" "$PYTHON" bench/run.py --parts "$parts" --runs 1 --steps 7 --out "$OUT" --readme "$OUT/README.md" \
    --work /tmp/lmtune-bench 2>&1 | tee "$OUT/bench_gpu.log"
bench=${PIPESTATUS[0]}
set -e
note() { case $1 in 0) echo "ok" ;; 124 | 137) echo "timed out" ;; *) echo "failed" ;; esac; }
echo "gpu check: tests exit $tests ($(note "$tests")), bench --parts $parts exit $bench ($(note "$bench")); files: $(ls "$OUT" | tr '\n' ' ')" \
    | tee "$OUT/summary.txt"
