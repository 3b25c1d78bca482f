"""Build the policy a run trains: warm start, device, precision, memory settings, LoRA, reference.

    threads -> warm start (or load) -> checks -> accelerator -> dropout off -> gradient checkpointing
    -> log-prob path check -> LoRA (+ adapters-off reference) or a frozen copy -> value head
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.models import disable_dropout
from gpo_exp.models.checks import (accelerator_device, check_loaded, cpu_threads, enable_gradient_checkpointing,
                                   warn_pure_low_precision)
from gpo_exp.models.lora import policy_and_reference
from gpo_exp.training.batching import check_logprob_path
from gpo_exp.training.objectives import Objective
from gpo_exp.training.warmstart import warm_start

log = logging.getLogger("gpo_exp")


def build_policy(cfg: Any, benchmark: Any, objective: Objective
                 ) -> tuple[PreTrainedModel, nn.Module | None, PreTrainedTokenizerBase, nn.Module | None, dict[str, Any]]:
    """(policy, reference or None, tokenizer, value head or None, warm-start info) for a validated run config."""
    tiny = cfg.model.source == "tiny"
    # tiny: its matrices are too small to split, so more threads only oversubscribe the cores
    torch.set_num_threads(cfg.trainer.cpu_threads or (1 if tiny else cpu_threads()))
    device = accelerator_device(cfg.trainer.accelerator)
    policy, tokenizer, ws = warm_start(cfg.model, benchmark, cfg.warm_start, device=device,
                                       precision=cfg.trainer.precision)
    check_loaded(policy, tokenizer, cfg.model, cfg.engine.max_new_tokens or benchmark.cfg.max_new_tokens)
    if not tiny:
        policy.to(device)  # the reference copy and the checks below then live on the accelerator too
        warn_pure_low_precision(policy, cfg.model)
    if cfg.model.disable_dropout and (n := disable_dropout(policy)):
        log.info("dropout: zeroed %d dropout rates in the policy (model.disable_dropout)", n)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
        log.info("gradient checkpointing: on (activations recomputed in the backward pass)")
    if not tiny:
        check_logprob_path(policy)
    policy, ref = policy_and_reference(policy, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout,
                                       cfg.model.lora_target_modules, reference=objective.uses_reference)
    if cfg.model.lora_r > 0:
        log.info("LoRA r=%d on %s: %d trainable of %d parameters", cfg.model.lora_r,
                 cfg.model.lora_target_modules or "peft's default modules",
                 sum(p.numel() for p in policy.parameters() if p.requires_grad),
                 sum(p.numel() for p in policy.parameters()))
    value_head = objective.make_value_head(policy) if objective.uses_value_head else None
    if value_head is not None:
        value_head.to(next(policy.parameters()).device)
    return policy, ref, tokenizer, value_head, ws
