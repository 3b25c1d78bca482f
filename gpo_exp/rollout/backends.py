"""Which engine generates: `engine.backend` picks the HF engine or vLLM, built from the same config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine, RolloutEngine


def check_backend(cfg: EngineConfig, lora_r: int = 0, devices: int = 1) -> None:
    """At start, before any model is loaded: one-line ConfigError when the backend cannot run here."""
    if cfg.backend == "vllm":
        from gpo_exp.rollout.vllm_engine import check_available

        check_available(cfg, lora_r=lora_r, devices=devices)


def build_engine(cfg: EngineConfig, policy: Any, tokenizer: Any, default_max_new_tokens: int, work_dir: Path,
                 seed: int = 0, progress: bool = False) -> RolloutEngine:
    """The rollout engine for `policy`. vLLM keeps its own weights and files (its model snapshot, the
    per-round LoRA adapters) under work_dir; the HF engine generates with `policy` itself."""
    if cfg.backend == "vllm":
        from gpo_exp.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(policy, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cfg=cfg,
                                 work_dir=Path(work_dir), default_max_new_tokens=default_max_new_tokens, seed=seed,
                                 progress=progress)
    return HFRolloutEngine(policy, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cfg=cfg,
                           default_max_new_tokens=default_max_new_tokens, progress=progress)
