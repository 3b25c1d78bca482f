"""The LightningDataModule: serves the current round's examples (refilled by the round callback)."""
from __future__ import annotations

from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from gpo_exp.training.objectives import Objective


def _collate(examples: list[dict[str, Any]], objective: Objective, pad_id: int) -> dict[str, Any]:
    if examples and examples[0].get("skip"):
        return {"skip": True}
    return objective.collate_step(examples, pad_id)  # micro-batches with their loss weights


class RolloutDataModule(pl.LightningDataModule):
    """Holds one round of examples; Lightning rebuilds the dataloader every epoch (= round)."""

    def __init__(self, objective: Objective, pad_id: int, seed: int = 0) -> None:
        super().__init__()
        self.objective = objective
        self.pad_id = pad_id
        self.seed = seed
        self.examples: list[dict[str, Any]] = []
        self.round = 0

    def set_examples(self, examples: list[dict[str, Any]], round_idx: int) -> None:
        self.examples = examples
        self.round = round_idx

    def train_dataloader(self) -> DataLoader:
        # An empty round still yields one batch, marked skip, so Lightning keeps the epoch (round) structure.
        data = self.examples or [{"skip": True}]
        bs = self.objective.cfg.batch_size
        if self.objective.kind == "rollouts":  # keep groups intact: examples come ordered by group
            return DataLoader(data * self.objective.passes, batch_size=bs, shuffle=False, collate_fn=partial(_collate, objective=self.objective, pad_id=self.pad_id))
        g = torch.Generator().manual_seed(self.seed * 1000 + self.round)
        return DataLoader(data * self.objective.cfg.epochs_per_round, batch_size=bs, shuffle=True, generator=g,
                          collate_fn=partial(_collate, objective=self.objective, pad_id=self.pad_id))
