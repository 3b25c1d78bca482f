"""LoRA adapters (peft) on the policy, and the frozen reference that goes with a policy.

With LoRA the frozen base *is* the reference policy: running the model with its adapters switched
off gives pi_ref exactly, so no second copy of the weights is kept (TRL does the same with a
`PeftModel` and `ref_model=None`).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from gpo_exp.registry import ConfigError


def apply_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float,
               target_modules: list[str] | str | None) -> PreTrainedModel:
    """Wrap `model` in a peft LoRA model: only the rank-`r` adapters train, the base weights are frozen."""
    import peft  # optional dependency: only LoRA runs need it

    targets = target_modules if isinstance(target_modules, str) or target_modules is None else list(target_modules)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=targets,
                          fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2 stores Conv1D weights transposed
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model ..."
        if "not found in the base model" not in str(e) and "target_modules" not in str(e):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear,))}
                       | {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"})
        raise ConfigError(f"bad config model.lora_target_modules={target_modules!r}: matches no module of "
                          f"{type(model).__name__}; its linear layers are {', '.join(names)} (or use all-linear)") from None


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdapterOffReference(nn.Module):
    """The reference policy of a LoRA model: the same module with its adapters disabled, in eval mode.

    The policy is held outside the module tree on purpose, so `requires_grad_(False)` / `eval()`
    on the reference (which the training module applies to any reference) leave the policy's
    adapters trainable and the policy is not registered, or saved, twice.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        if not is_lora(policy):
            raise TypeError(f"AdapterOffReference needs a peft LoRA model, got {type(policy).__name__}")
        self._policy = (policy,)  # a tuple is not registered as a submodule

    @property
    def policy(self) -> nn.Module:
        return self._policy[0]

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @contextmanager
    def adapters_off(self) -> Iterator[None]:
        """The policy as the reference: adapters disabled, eval mode (no dropout), no gradient."""
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.disable_adapter():
                yield
        finally:
            policy.train(was_training)

    def forward(self, **kwargs: Any) -> Any:
        with self.adapters_off():
            return self.policy(**kwargs)


def policy_and_reference(model: PreTrainedModel, lora_r: int = 0, lora_alpha: float = 16.0,
                         lora_dropout: float = 0.0, lora_target_modules: list[str] | str | None = None,
                         reference: bool = True) -> tuple[PreTrainedModel, nn.Module | None]:
    """(policy to train, frozen reference or None); `model` becomes the policy.

    lora_r > 0: the policy is `model` with LoRA adapters and the reference its adapters-off view;
    otherwise the reference is a frozen copy of `model` taken now.
    """
    if lora_r > 0:
        policy = apply_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules)
        return policy, AdapterOffReference(policy) if reference else None
    return model, copy.deepcopy(model).eval().requires_grad_(False) if reference else None
