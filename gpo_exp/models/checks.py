"""Start-of-run checks and settings for a loaded policy: each problem stops the run with one line."""
from __future__ import annotations

import logging
import os

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.models.config import ModelConfig
from gpo_exp.registry import ConfigError

log = logging.getLogger(__name__)


def context_length(model: PreTrainedModel) -> int | None:
    """The model's maximum sequence length from its config (None when it does not say)."""
    cfg = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    return None


def check_loaded(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig,
                 max_new_tokens: int) -> None:
    """The loaded model can run this config: a chat template where required, room for the answers."""
    if cfg.require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"bad config model.require_chat_template=true: the tokenizer of {cfg.path or cfg.name!r} "
                          f"has no chat template (set model.require_chat_template=false to use plain text)")
    n = context_length(model)
    if n is not None and max_new_tokens >= n:
        raise ConfigError(f"bad config max_new_tokens={max_new_tokens}: must be < the model's context of {n} tokens "
                          f"(set engine.max_new_tokens or benchmark.max_new_tokens)")


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: works with frozen
    LoRA bases without making the inputs require grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"bad config model.gradient_checkpointing=true: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a cache is useless (and warned about) when activations are recomputed


def warn_pure_low_precision(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """Full fine-tuning of bf16/fp16 weights has no fp32 master copy: say what that costs."""
    if cfg.dtype != "float32" and cfg.lora_r == 0:
        log.warning("model.dtype=%s with full fine-tuning: AdamW updates %s weights directly (no fp32 master "
                    "copy), so updates below ~1/256 of a weight (typical at lr 1e-5) are rounded away. "
                    "model.dtype=float32 with trainer.precision=bf16-mixed keeps fp32 masters; with LoRA, "
                    "a bf16 base is fine (the adapters stay fp32).", cfg.dtype, cfg.dtype)


def cpu_threads() -> int:
    """CPUs this process may use (cgroup/affinity aware, unlike os.cpu_count on a shared node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def accelerator_device(accelerator: str) -> torch.device:
    """The device a Lightning `accelerator` setting trains on in this process (its local rank's GPU)."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        if not torch.cuda.is_available():
            raise ConfigError(f"bad config trainer.accelerator={accelerator!r}: no CUDA GPU is visible here")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if accelerator not in ("cpu", "auto"):
        raise ConfigError(f"bad config trainer.accelerator={accelerator!r}: must be cpu, gpu, cuda or auto")
    return torch.device("cpu")
