"""The prepared GPU check (`python -m gpo_exp.bench.gpu_round`): its runs' overrides are valid configs in
bf16 with LoRA, its Qwen2-1.5B-shaped model directory loads, and (slow) the whole check runs end to end
at smoke sizes on the CPU (`--cpu-smoke`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpo_exp.bench import gpu_round

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["tiny", "qwen2-1.5b"])
def test_the_gpu_runs_are_valid_bf16_lora_configs(compose, tmp_path, name):
    from gpo_exp.training.run_config import validate

    args = gpu_round.run_args(name, tmp_path / "run", gpu=True, smoke=False, model_dir=tmp_path / "model")
    overrides = [a for a in args if not a.startswith("hydra.")]
    cfg = validate(compose(overrides))
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.lora_r > 0 and cfg.optimizer.name == "dpo" and cfg.gpo.enabled
    assert cfg.trainer.rounds == 2 and not cfg.trainer.fast_dev_run
    if name == "qwen2-1.5b":
        assert cfg.model.dtype == "bfloat16" and cfg.model.lora_target_modules == "all-linear"
        assert cfg.model.source == "hub" and cfg.model.path == str(tmp_path / "model")
    smoke = gpu_round.run_args(name, tmp_path / "run", gpu=False, smoke=True, model_dir=tmp_path / "model")
    assert "trainer.fast_dev_run=true" in smoke and "trainer.accelerator=cpu" in smoke


def test_the_padded_character_tokenizer_has_the_vocabulary_and_round_trips():
    tok = gpu_round.char_tokenizer_padded(["Q: 7,+5\nAnswer: 12"], 1000)
    assert len(tok) == 1000 and tok.eos_token_id is not None
    ids = tok("Q: 5,+7")["input_ids"]
    assert tok.decode(ids) == "Q: 5,+7" and max(ids) < 30
    assert tok.decode([999]).startswith("<|unused")  # a sampled id past the characters still decodes


def test_the_qwen2_model_directory_loads_with_qwen2_15b_vocabulary_and_shape_ratios(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = gpu_round.write_qwen2_dir(tmp_path / "m", smoke=True, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    conf = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and conf.vocab_size == len(tok) == 151_936 == info["vocab"]
    assert conf.num_attention_heads // conf.num_key_value_heads == 6 and conf.tie_word_embeddings  # 12/2 heads, tied
    assert str(model.dtype) == "torch.bfloat16" and conf.eos_token_id == tok.eos_token_id


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_at_smoke_sizes_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpo_exp.bench.gpu_round", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_round.json").read_text())
    steps = res["steps"]
    assert steps["tiny"]["status"] == "ok" and steps["tiny"]["pairs"] > 0 and steps["tiny"]["rollout_tok_s"] > 0
    assert steps["qwen2-1.5b"]["status"] in ("ok", "no_signal") and steps["qwen2-1.5b"]["generated_tokens"] > 0
    assert steps["memory"]["status"] == "ok" and any("precompute" in line for line in steps["memory"]["table"])
    assert steps["engine"]["status"] == "ok" and any("(a) engine" in line for line in steps["engine"]["table"])
