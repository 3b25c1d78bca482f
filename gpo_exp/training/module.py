"""The LightningModule: the policy, a frozen reference, and the base optimizer's loss."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from transformers import PreTrainedModel

from gpo_exp.training.objectives import Objective


class PolicyModule(pl.LightningModule):
    def __init__(self, policy: PreTrainedModel, objective: Objective, ref: PreTrainedModel | None = None,
                 value_head: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.objective = objective
        self.ref = ref
        if ref is not None:  # frozen: no gradients, never in the optimizer, always in eval mode
            ref.requires_grad_(False)
            ref.eval()
        self.value_head = value_head
        self.skipped_batches = 0  # batches with no preference signal (nothing to learn from)

    def on_train_epoch_start(self) -> None:
        self.policy.train()  # generation and evaluation leave it in eval mode
        if self.ref is not None:
            self.ref.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch.get("skip"):
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            return None  # Lightning skips the optimizer step
        loss, metrics = self.objective.loss(self.policy, batch, self.ref, self.value_head)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {self.objective.cfg.name} loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapters only
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return adamw(params, self.objective.cfg.lr, self.objective.cfg.weight_decay)


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """The run's optimizer. Not `fused=True`: Lightning refuses gradient clipping for a fused optimizer
    under mixed precision (seen on an H200 with trainer.precision=bf16-mixed)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
