# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; users with GPUs install their own build first (pyproject's range stays open).
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test test-fast ablate ablate-small bench lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	DS_ACCELERATOR=cpu WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m twinlm.demo

test: install
	DS_ACCELERATOR=cpu WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
		$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The same without the multi-process and subprocess tests (marked slow): a quick check while editing.
test-fast: install
	DS_ACCELERATOR=cpu WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
		$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

# Every design question in configs/ablations/ at scale tiny: a CI-fast demonstration (reports: docs/ablations/tiny/).
ablate: install
	DS_ACCELERATOR=cpu WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false \
		$(PY) -m twinlm.cli ablate configs/ablations/*.yaml --scale tiny --out docs/ablations/tiny --runs outputs/ablations/tiny

# The same questions at scale small, the committed answers (docs/ablations/; 141 runs, 4.0 hours on 2 cores, resumable:
# the same command goes on where it stopped). Reads ../shared/data/corpus-modern.
ablate-small: install
	DS_ACCELERATOR=cpu WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false \
		$(PY) -m twinlm.cli ablate configs/ablations/*.yaml --scale small --out docs/ablations --runs outputs/ablations/small

# twinlm against the transformers references, side by side, and attention against sequence length (results:
# benchmarks/results/; ~15 min on 2 cores before the long-context section, which adds several minutes).
bench: install
	$(PY) benchmarks/run_all.py

lint: install
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks

format: install
	$(VENV)/bin/ruff format src tests scripts benchmarks
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
