"""The optimizer interface: turn candidate groups into examples, precompute, and compute the loss.

A *group* is a set of scored continuations of one shared prefix: the reset prefix under GPO, the bare
prompt in the baseline arm. Each base optimizer decides what it trains on from groups (pairs,
unpaired examples, or rollouts) and how to compute its loss; the GPO machinery is the same for all.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from gpo_exp.registry import Registry, check
from gpo_exp.rollout.types import Continuation, Group

LOSS_MASKS = ("completion", "continuation")


@dataclass
class OptimizerConfig:
    """Fields every base optimizer has."""

    name: str = "dpo"  # registry name: dpo | ipo | kto | simpo | orpo | ppo | grpo
    lr: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 16  # examples (pairs, unpaired examples or rollouts) per optimizer step
    epochs_per_round: int = 1  # passes over one round's examples
    precompute_ref: bool = True  # reference log-probs once when the data is built (false: in every step)
    loss_mask: str = "completion"  # completion: every token after the prompt (paper) | continuation: only after the shared prefix

    def __post_init__(self) -> None:
        check(self.lr > 0, "optimizer.lr", self.lr, "> 0")
        check(self.batch_size >= 1, "optimizer.batch_size", self.batch_size, ">= 1")
        check(self.epochs_per_round >= 1, "optimizer.epochs_per_round", self.epochs_per_round, ">= 1")
        check(self.loss_mask in LOSS_MASKS, "optimizer.loss_mask", self.loss_mask, f"one of {', '.join(LOSS_MASKS)}")


class Objective:
    """Base class. `kind` says what examples are: pairs | unpaired | rollouts."""

    kind = "pairs"
    uses_reference = True  # SimPO and ORPO train without a reference model
    uses_value_head = False  # PPO adds a value head
    passes = 1  # times the DataModule serves one round's rollouts (PPO: ppo_epochs)

    def __init__(self, cfg: OptimizerConfig) -> None:
        self.cfg = cfg

    def start(self, group: Group) -> int:
        """Index in prompt+prefix+continuation where the trained tokens start (the loss mask)."""
        n = len(group.prompt_ids)
        return n if self.cfg.loss_mask == "completion" else n + len(group.prefix_ids)

    def make_value_head(self, policy: nn.Module) -> nn.Module:
        """A value head for the policy (only objectives with `uses_value_head`)."""
        raise NotImplementedError(f"{type(self).__name__} has no value head")

    def make_examples(self, groups: Sequence[Group], limit: int, rng: random.Random,
                      pairs_per_group: int = 1) -> list[dict[str, Any]]:
        raise NotImplementedError

    def precompute(self, examples: list[dict[str, Any]], policy: nn.Module, ref: nn.Module | None,
                   pad_id: int) -> None:
        """Fill reference (and, for on-policy methods, old-policy) log-probs into the examples."""

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, policy: nn.Module, batch: dict[str, torch.Tensor], ref: nn.Module | None,
             value_head: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


OPTIMIZERS: Registry[Objective] = Registry("optimizer")


def split_outcomes(group: Group) -> tuple[list[Continuation], list[Continuation]]:
    """(correct, incorrect) distinct continuations of a group; rewards are 0/1 outcomes.

    Identical token sequences (a reused estimation rollout equal to a fresh sample, say) count once,
    so a group never yields the same pair twice.
    """
    seen: set[tuple[int, ...]] = set()
    good, bad = [], []
    for c in group.continuations:
        if tuple(c.ids) in seen:
            continue
        seen.add(tuple(c.ids))
        (good if c.reward > 0.5 else bad).append(c)
    return good, bad


def preference_pairs(groups: Sequence[Group], limit: int, rng: random.Random,
                     pairs_per_group: int) -> list[tuple[Group, Continuation, Continuation]]:
    """Up to `pairs_per_group` distinct (chosen correct, rejected incorrect) pairs per group, `limit` in all.

    Groups are visited in a seeded random order so the cap does not favour early prompts.
    """
    order = list(groups)
    rng.shuffle(order)
    out = []
    for g in order:
        good, bad = split_outcomes(g)
        combos = [(c, r) for c in good for r in bad]
        for c, r in rng.sample(combos, min(pairs_per_group, len(combos))):
            out.append((g, c, r))
            if len(out) >= limit:
                return out
    return out
