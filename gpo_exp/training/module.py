"""The LightningModule: the policy, a frozen reference, and the base optimizer's loss.

Manual optimization, so one optimizer step can accumulate micro-batches: each step's data arrives
as micro-batches with loss weights (`Objective.collate_step`), every weighted micro-loss is
back-propagated on its own (activations of one micro-batch alive at a time), then the step clips
and updates once. The accumulated gradient is the full batch's, including losses that need the whole
batch (KTO's KL point via `step_context`, token means via the weights).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from transformers import PreTrainedModel

from gpo_exp.training.objectives import Objective


class PolicyModule(pl.LightningModule):
    def __init__(self, policy: PreTrainedModel, objective: Objective, ref: PreTrainedModel | None = None,
                 value_head: nn.Module | None = None, gradient_clip_val: float | None = 1.0) -> None:
        super().__init__()
        self.automatic_optimization = False  # micro-batch accumulation inside one step (see module doc)
        self.policy = policy
        self.objective = objective
        self.ref = ref
        if ref is not None:  # frozen: no gradients, never in the optimizer, always in eval mode
            ref.requires_grad_(False)
            ref.eval()
        self.value_head = value_head
        self.gradient_clip_val = gradient_clip_val
        self.skipped_batches = 0  # batches with no preference signal (nothing to learn from)

    def on_train_epoch_start(self) -> None:
        self.policy.train()  # generation and evaluation leave it in eval mode
        if self.ref is not None:
            self.ref.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch.get("skip"):
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            return None  # no optimizer step
        opt = self.optimizers()
        context = self.objective.step_context(self.policy, self.ref, batch)
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        for part, weight in zip(batch["micro"], batch["weights"]):
            loss, m = self.objective.loss(self.policy, part, self.ref, self.value_head, context)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {self.objective.cfg.name} loss {loss.item()} at step {self.global_step}")
            self.manual_backward(loss * weight)
            total += loss.detach() * weight
            for k, v in m.items():  # metrics averaged with the loss weights
                metrics[k] = metrics.get(k, 0.0) + weight * float(v)
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        n = sum(int(p["input_ids"].shape[0]) for p in batch["micro"])
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapters only
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return adamw(params, self.objective.cfg.lr, self.objective.cfg.weight_decay)


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """The run's optimizer. Not `fused=True`: Lightning refuses gradient clipping for a fused optimizer
    under mixed precision (seen on an H200 with trainer.precision=bf16-mixed)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
