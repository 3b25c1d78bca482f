"""The LightningDataModule: serves the current round's examples (refilled by the round callback).

With several ranks, every batch of a one-process run (same order, same shuffle) is split into one
contiguous slice per rank, so the ranks take the same optimizer steps, on the same examples, as one
process would, and DDP never waits on a rank that ran out (a batch smaller than the world repeats
examples to give every rank one).
"""
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


def rank_slice(batch: list[Any], rank: int, world: int) -> list[Any]:
    """Rank's contiguous slice of one global batch (sizes differ by at most one; never empty)."""
    if len(batch) < world:
        batch = [batch[i % len(batch)] for i in range(world)]
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return batch[start: start + base + (rank < extra)]


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

    def state_dict(self) -> dict[str, Any]:
        # The examples themselves are regenerated on resume (from the weights and the round's seed).
        return {"round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        # An empty round still yields one batch, marked skip, so Lightning keeps the epoch (round) structure.
        data = self.examples or [{"skip": True}]
        bs = self.objective.cfg.batch_size
        collate = partial(_collate, objective=self.objective, pad_id=self.pad_id)
        rank, world = self._world()
        if self.objective.kind == "rollouts":  # keep groups intact: examples come ordered by group
            data, shuffle = data * self.objective.passes, False
        else:
            data, shuffle = data * self.objective.cfg.epochs_per_round, True
        g = torch.Generator().manual_seed(self.seed * 1000 + self.round)
        # The round's batches are drawn here, once, and served in that order. A shuffling DataLoader would
        # draw again every time its iterator is created, and Lightning creates it more than once when a fit
        # resumes from a round checkpoint: the resumed round then trained on another order (the drift a
        # kill-and-resume showed in the weights, ~1e-6 after a round, and in later rounds' accuracies).
        index_batches = DataLoader(range(len(data)), batch_size=bs, shuffle=shuffle, generator=g if shuffle else None)
        # every batch of a one-process run (the same generator draws), each rank taking its slice of it
        mine = [[data[i] for i in rank_slice(b.tolist(), rank, world)] for b in index_batches]
        return DataLoader(mine, batch_size=None, collate_fn=collate)
