"""Which engine generates: `engine.backend` picks the HF engine or vLLM, built from the same config."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine, RolloutEngine

TINY_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # models/tiny.py, by model.arch


def config_architecture(model_cfg: Any) -> str | None:
    """The HF class a model config builds, when the config alone says (tiny, random); None for hub/gguf
    models, whose class is known once loaded."""
    source = getattr(model_cfg, "source", None)
    if source == "tiny":
        return TINY_ARCHITECTURES.get(model_cfg.arch)
    if source == "random":
        return "Qwen2ForCausalLM"  # models/random_init.py builds a Qwen2 twin
    return None


def check_backend(cfg: EngineConfig, lora_r: int = 0, devices: int = 1, model: Any = None,
                  temperatures: Sequence[float | None] = ()) -> None:
    """At start, before any model is loaded: one-line ConfigError when the backend cannot run here or
    cannot serve this model config (`model`: the run's ModelConfig; `temperatures`: other sampling
    temperatures of the run, e.g. estimator.temperature)."""
    if cfg.backend == "vllm":
        from gpo_exp.rollout.vllm_engine import check_available

        check_available(cfg, lora_r=lora_r, devices=devices, architecture=config_architecture(model),
                        temperatures=temperatures)


def longest_prompt(tokenizer: Any, benchmark: Any, rows: Sequence[dict[str, Any]], chat_template: bool) -> int:
    """Tokens of the longest prompt among `rows`, encoded as the sampler encodes them."""
    from gpo_exp.models.prompting import encode_prompt

    return max((len(encode_prompt(tokenizer, benchmark.prompt(r), chat_template)) for r in rows), default=1)


def build_engine(cfg: EngineConfig, policy: Any, tokenizer: Any, default_max_new_tokens: int, work_dir: Path,
                 seed: int = 0, progress: bool = False, max_prompt_len: int | None = None) -> RolloutEngine:
    """The rollout engine for `policy`. vLLM keeps its own weights and files (its model snapshot, the
    per-round LoRA adapters) under work_dir, and sizes its KV cache from `max_prompt_len` (the run's
    longest prompt; see vllm_engine.resolve_max_model_len); the HF engine generates with `policy` itself."""
    if cfg.backend == "vllm":
        from gpo_exp.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(policy, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cfg=cfg,
                                 work_dir=Path(work_dir), default_max_new_tokens=default_max_new_tokens, seed=seed,
                                 progress=progress, max_prompt_len=max_prompt_len)
    return HFRolloutEngine(policy, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cfg=cfg,
                           default_max_new_tokens=default_max_new_tokens, progress=progress)
