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
    loss_mask: str = "continuation"  # continuation: only tokens sampled after a reset group's shared prefix (fresh groups: the whole completion) | completion: every token after the prompt, the shared prefix too (the paper's code)
    micro_batch_size: int | None = None  # examples per forward/backward; the step accumulates batch_size / micro_batch_size of them (same loss and gradient); null: the whole batch at once

    def __post_init__(self) -> None:
        check(self.lr > 0, "optimizer.lr", self.lr, "> 0")
        check(self.batch_size >= 1, "optimizer.batch_size", self.batch_size, ">= 1")
        m = self.micro_batch_size
        check(m is None or (m >= 1 and self.batch_size % m == 0), "optimizer.micro_batch_size", m,
              f"null or a divisor of optimizer.batch_size={self.batch_size}")
        check(self.epochs_per_round >= 1, "optimizer.epochs_per_round", self.epochs_per_round, ">= 1")
        check(self.loss_mask in LOSS_MASKS, "optimizer.loss_mask", self.loss_mask, f"one of {', '.join(LOSS_MASKS)}")


class Objective:
    """Base class. `kind` says what examples are: pairs | unpaired | rollouts."""

    kind = "pairs"
    reduction = "examples"  # what the loss averages over: examples (a mean of per-example losses) | tokens (a masked mean over the batch's tokens)
    uses_reference = True  # SimPO and ORPO train without a reference model
    uses_value_head = False  # PPO adds a value head
    passes = 1  # times the DataModule serves one round's rollouts (PPO: ppo_epochs)

    def __init__(self, cfg: OptimizerConfig) -> None:
        self.cfg = cfg

    def start(self, group: Group, cont: Continuation | None = None) -> int:
        """Index in prompt+prefix+continuation where the trained tokens start (the loss mask).

        continuation: after the group's shared prefix and after `cont.frozen` copied prefix tokens (a
        substituted trajectory), so a reset rollout trains only what was sampled at the reset point."""
        n = len(group.prompt_ids)
        if self.cfg.loss_mask == "completion":
            return n
        return n + len(group.prefix_ids) + (cont.frozen if cont is not None else 0)

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

    def collate_step(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """One optimizer step's data: micro-batches of `micro_batch_size` examples and their weights.

        A weight is the micro-batch's share of what the loss averages over (examples, or trained
        tokens for token-mean losses), so sum_i w_i * loss(micro_i) is the full batch's loss and
        accumulating the weighted gradients gives the full batch's gradient.
        """
        m = self.cfg.micro_batch_size or len(examples)
        parts = [self.collate(examples[i: i + m], pad_id) for i in range(0, len(examples), m)]
        if self.reduction == "tokens":
            sizes = [float(p["loss_mask"].sum()) for p in parts]
        else:
            sizes = [float(len(examples[i: i + m])) for i in range(0, len(examples), m)]
        total = sum(sizes) or 1.0
        return {"micro": parts, "weights": [n / total for n in sizes]}

    def step_context(self, policy: nn.Module, ref: nn.Module | None, step: dict[str, Any]) -> Any:
        """Whole-batch quantities a micro-batch's loss needs (KTO's KL reference point); None by default."""
        return None

    def loss(self, policy: nn.Module, batch: dict[str, torch.Tensor], ref: nn.Module | None,
             value_head: nn.Module | None = None, context: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one (micro-)batch and its metrics; `context` comes from `step_context`."""
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
