"""On-policy optimizers over rollouts: PPO (with a value head) and GRPO (group-normalised advantages).

A rollout is prompt + prefix + one continuation of a group, with its 0/1 reward. Both objectives see
the same rollouts per round: groups in a seeded random order (so the cap does not favour early
prompts, as `preference_pairs`), each group's rollouts contiguous, whole groups only, at most
`limit * rollouts_per_example` rollouts. The cap counts rollouts rather than groups because GPO's
reset groups (M fresh + reused + original continuations) are larger than the baseline's
(samples_per_prompt), so both arms train on the same number of sequences.

`precompute` runs once per round with the rollout policy: its per-token log-probs are the "old"
log-probs of the importance ratio. Per-token arrays are stored on the examples over the trained span
only (tokens from `start` on, `loss_mask`) and scattered back into the padded batch by `collate`.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from gpo_exp import losses
from gpo_exp.registry import check
from gpo_exp.training.batching import length_batches, model_device, pad_sequences, token_logps
from gpo_exp.training.objectives.base import OPTIMIZERS, Group, Objective, OptimizerConfig

# Per-token fields stored over the trained span and scattered into (B, T) by `collate`.
TOKEN_FIELDS = ("old_logps", "ref_logps", "old_values", "advantages", "returns")


@dataclass
class RolloutConfig(OptimizerConfig):
    """Fields shared by the rollout optimizers."""

    rollouts_per_example: int = 4  # round cap: examples_per_round * this many rollouts (4 = default samples_per_prompt)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.rollouts_per_example >= 1, "optimizer.rollouts_per_example", self.rollouts_per_example, ">= 1")
        # The rollout DataLoader makes one ordered pass; PPO's extra passes are `ppo_epochs`.
        check(self.epochs_per_round == 1, "optimizer.epochs_per_round", self.epochs_per_round,
              "1 for rollout optimizers (ppo: set ppo_epochs)")


@dataclass
class PPOConfig(RolloutConfig):
    name: str = "ppo"  # registry name
    lr: float = 1e-5  # AdamW learning rate
    clip_range: float = 0.2  # policy ratio clip epsilon (PPO paper; TRL cliprange)
    clip_range_value: float = 0.2  # value clip around the old values (TRL cliprange_value)
    vf_coef: float = 0.1  # weight of the value loss (TRL default)
    gamma: float = 1.0  # discount over tokens
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.05  # per-token KL penalty to the reference in the reward (TRL kl_coef)
    whiten_advantages: bool = True  # normalise advantages over the round's buffer (TRL whitens)
    ppo_epochs: int = 2  # passes over the round's buffer (TRL num_ppo_epochs 4; 2 keeps rounds short)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.clip_range > 0, "optimizer.clip_range", self.clip_range, "> 0")
        check(self.clip_range_value > 0, "optimizer.clip_range_value", self.clip_range_value, "> 0")
        check(self.vf_coef >= 0, "optimizer.vf_coef", self.vf_coef, ">= 0")
        check(0 < self.gamma <= 1, "optimizer.gamma", self.gamma, "in (0, 1]")
        check(0 <= self.lam <= 1, "optimizer.lam", self.lam, "in [0, 1]")
        check(self.kl_coef >= 0, "optimizer.kl_coef", self.kl_coef, ">= 0")
        check(self.ppo_epochs >= 1, "optimizer.ppo_epochs", self.ppo_epochs, ">= 1")
        # The KL-shaped rewards (and so the advantages) need the reference before training starts.
        check(self.precompute_ref, "optimizer.precompute_ref", self.precompute_ref,
              "true for ppo (its rewards use reference log-probs when the round's data is built)")


@dataclass
class GRPOConfig(RolloutConfig):
    name: str = "grpo"  # registry name
    lr: float = 1e-5  # AdamW learning rate
    epsilon: float = 0.2  # ratio clip epsilon (TRL default)
    beta: float = 0.0  # KL coefficient to the reference; 0 trains without a reference (TRL default)
    scale_rewards: bool = True  # divide by the group std (TRL scale_rewards="group"); false: mean-centre only
    group_size: int | None = None  # null: a group's continuations as given; n: a seeded subset of at most n
    min_group_size: int = 2  # smaller groups are skipped (the group std needs two samples)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.epsilon > 0, "optimizer.epsilon", self.epsilon, "> 0")
        check(self.beta >= 0, "optimizer.beta", self.beta, ">= 0")
        check(self.min_group_size >= 2, "optimizer.min_group_size", self.min_group_size, ">= 2")
        check(self.group_size is None or self.group_size >= max(2, self.min_group_size), "optimizer.group_size",
              self.group_size, f"null or >= {max(2, self.min_group_size)} (>= 2 and >= min_group_size)")


# ----------------------------------------------------------------------------- shared helpers


def trained(obj: Objective, g: Group) -> list:
    """Continuations of `g` with at least one trained token (prompt + prefix + ids longer than their start)."""
    head = len(g.prompt_ids) + len(g.prefix_ids)
    return [c for c in g.continuations if head + len(c.ids) > obj.start(g, c)]


def take_groups(groups: Sequence[tuple[Group, list]], cap: int, rng: random.Random) -> list[tuple[Group, list]]:
    """Whole groups in a seeded random order while they fit in `cap` rollouts (a group too big is passed over)."""
    order = list(groups)
    rng.shuffle(order)
    out, n = [], 0
    for g, conts in order:
        if n + len(conts) <= cap:
            out.append((g, conts))
            n += len(conts)
    return out


def rollout(obj: Objective, g: Group, cont: Any, group_idx: int) -> dict[str, Any]:
    return {"ids": g.prompt_ids + g.prefix_ids + cont.ids, "start": obj.start(g, cont), "reward": float(cont.reward),
            "group": group_idx, "prefix_len": len(g.prefix_ids), "uid": g.uid, "step": g.step}


def span(e: dict[str, Any]) -> int:
    """Number of trained tokens of a rollout."""
    return len(e["ids"]) - e["start"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the old-policy pass, restoring the previous mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def forward(model: nn.Module, batch: dict[str, torch.Tensor],
            value_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, T) and, with a value head, per-token values (B, T), on trained tokens.

    Column t holds log p(token t | tokens < t) and the value of the state before token t (both read
    at position t-1), for the tokens of `loss_mask`; every other column is 0 (`batching.token_logps`).
    """
    return token_logps(model, batch["input_ids"], batch["attention_mask"], positions=batch["loss_mask"],
                       value_head=value_head)


def spans(x: torch.Tensor, examples: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Per-example lists of `x` (B, T) over each trained span [start, len(ids))."""
    return [x[i, e["start"]: len(e["ids"])].tolist() for i, e in enumerate(examples)]


def left_aligned(rows: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) tensor of `rows` and its 0/1 mask (what `losses.gae` expects)."""
    L = max(len(r) for r in rows)
    x = torch.zeros(len(rows), L)
    mask = torch.zeros(len(rows), L)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return x, mask


def with_current(x: torch.Tensor, current: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` on trained tokens, the detached current values elsewhere (keeps exp() finite off the mask)."""
    return torch.where(mask.bool(), x.to(current.dtype), current.detach())


class RolloutObjective(Objective):
    """Shared collate / old-policy pass; subclasses pick the rollouts and the loss."""

    kind = "rollouts"
    reduction = "tokens"  # PPO and GRPO average over the batch's trained tokens
    cfg: RolloutConfig

    def cap(self, limit: int) -> int:
        return limit * self.cfg.rollouts_per_example

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_sequences([e["ids"] for e in examples], [e["start"] for e in examples], pad_id)
        T = batch["input_ids"].shape[1]
        for key in TOKEN_FIELDS:
            if key in examples[0]:
                x = torch.zeros(len(examples), T)
                for i, e in enumerate(examples):
                    x[i, e["start"]: len(e["ids"])] = torch.tensor(e[key], dtype=torch.float32)
                batch[key] = x
        batch["reward"] = torch.tensor([e["reward"] for e in examples], dtype=torch.float32)
        if "advantage" in examples[0]:
            batch["advantage"] = torch.tensor([e["advantage"] for e in examples], dtype=torch.float32)
        return batch

    @torch.no_grad()
    def token_pass(self, examples: list[dict[str, Any]], model: nn.Module, pad_id: int, key: str,
                   value_head: nn.Module | None = None) -> None:
        """Store `model`'s per-token log-probs (and values under `old_values`) on the examples as `key`."""
        device = model_device(model)
        with eval_mode(model):
            for idx in length_batches([len(e["ids"]) for e in examples], self.cfg.batch_size):
                chunk = [examples[i] for i in idx]
                batch = pad_sequences([e["ids"] for e in chunk], [e["start"] for e in chunk], pad_id)
                logps, values = forward(model, {k: v.to(device) for k, v in batch.items()}, value_head)
                for e, lp in zip(chunk, spans(logps, chunk)):
                    e[key] = lp
                if values is not None:
                    for e, v in zip(chunk, spans(values, chunk)):
                        e["old_values"] = v


# ----------------------------------------------------------------------------- PPO


@OPTIMIZERS.register("ppo", PPOConfig)
class PPO(RolloutObjective):
    """PPO with a KL-shaped token reward, GAE and a value head on the policy's last hidden state.

    Every continuation of every group is a rollout (the group structure is not used by the loss).
    `ppo_epochs` passes: the DataModule serves the round's buffer `passes` times, in order (the
    rollout DataLoader does not shuffle); when the buffer is not a multiple of batch_size, one batch
    holds the end of a pass and the start of the next.
    """

    cfg: PPOConfig
    uses_value_head = True

    @property
    def passes(self) -> int:
        return self.cfg.ppo_epochs

    def __init__(self, cfg: PPOConfig) -> None:
        super().__init__(cfg)
        self.value_head: nn.Module | None = None

    def make_value_head(self, policy: nn.Module) -> nn.Module:
        """A linear value head on the last hidden state (zero bias); kept here for `precompute`'s old values."""
        hidden = policy.config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1)
        nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(head.bias)
        self.value_head = head
        return head

    def make_examples(self, groups: Sequence[Group], limit: int, rng: random.Random,
                      pairs_per_group: int = 1) -> list[dict[str, Any]]:
        """One rollout per continuation of every group; whole groups up to `limit * rollouts_per_example`."""
        usable = [(g, trained(self, g)) for g in groups]
        chosen = take_groups([(g, c) for g, c in usable if c], self.cap(limit), rng)
        return [rollout(self, g, c, k) for k, (g, conts) in enumerate(chosen) for c in conts]

    @torch.no_grad()
    def precompute(self, examples: list[dict[str, Any]], policy: nn.Module, ref: nn.Module | None,
                   pad_id: int) -> None:
        """Old log-probs and values (rollout policy), reference log-probs, then rewards and GAE for the buffer."""
        if not examples:
            return
        assert ref is not None and self.value_head is not None, "PPO needs the reference and make_value_head()"
        self.token_pass(examples, policy, pad_id, "old_logps", self.value_head)
        self.token_pass(examples, ref, pad_id, "ref_logps")
        logps, mask = left_aligned([e["old_logps"] for e in examples])
        ref_logps, _ = left_aligned([e["ref_logps"] for e in examples])
        values, _ = left_aligned([e["old_values"] for e in examples])
        score = torch.tensor([e["reward"] for e in examples])
        rewards = losses.ppo_kl_rewards(score, logps, ref_logps, mask, kl_coef=self.cfg.kl_coef)
        adv, returns = losses.gae(rewards, values, mask, gamma=self.cfg.gamma, lam=self.cfg.lam)
        if self.cfg.whiten_advantages and mask.sum() >= 2:
            adv = losses.masked_whiten(adv, mask) * mask
        for i, e in enumerate(examples):
            n = span(e)
            e["advantages"], e["returns"] = adv[i, :n].tolist(), returns[i, :n].tolist()

    def loss(self, policy: nn.Module, batch: dict[str, torch.Tensor], ref: nn.Module | None,
             value_head: nn.Module | None = None, context: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        head = value_head if value_head is not None else self.value_head
        assert head is not None, "PPO needs its value head"
        logps, values = forward(policy, batch, head)
        assert values is not None
        mask = batch["loss_mask"]
        old = with_current(batch["old_logps"], logps, mask)
        pg_loss, pg_clipfrac = losses.ppo_policy_loss(logps, old, batch["advantages"].to(logps), mask,
                                                      clip_range=self.cfg.clip_range)
        old_values = with_current(batch["old_values"], values, mask)
        vf_loss, vf_clipfrac = losses.ppo_value_loss(values, old_values, batch["returns"].to(values), mask,
                                                     clip_range_value=self.cfg.clip_range_value)
        loss = pg_loss + self.cfg.vf_coef * vf_loss
        with torch.no_grad():
            log_ratio = (logps - old) * mask
            kl_ref = ((logps - with_current(batch["ref_logps"], logps, mask)) * mask).sum(-1)
        metrics = {
            "loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
            "policy/clipfrac": pg_clipfrac.item(), "val/clipfrac": vf_clipfrac.item(),
            "policy/approxkl": (0.5 * losses.masked_mean(log_ratio ** 2, mask)).item(),
            "objective/kl": kl_ref.mean().item(),  # summed log-ratio to the reference per rollout (TRL)
            "objective/scores": batch["reward"].mean().item(),
        }
        return loss, metrics


# ----------------------------------------------------------------------------- GRPO


@OPTIMIZERS.register("grpo", GRPOConfig)
class GRPO(RolloutObjective):
    """GRPO: a group is the continuations of one Group (M reset continuations of one prefix under GPO,
    the samples of one prompt in the baseline); advantages are normalised within it.

    A group whose rewards are all equal has advantage 0 everywhere and is skipped; so is a group
    smaller than `min_group_size`. Both are counted in `skipped_groups` (run total, also a metric).
    A round where every group is skipped yields no examples (the datamodule then serves a skip batch).
    """

    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig) -> None:
        super().__init__(cfg)
        self.uses_reference = cfg.beta > 0  # beta 0: no reference model is built at all
        self.skipped_groups = 0  # groups without signal (all rewards equal, or too small), all rounds
        self.seen_groups = 0  # groups offered to make_examples, all rounds

    def make_examples(self, groups: Sequence[Group], limit: int, rng: random.Random,
                      pairs_per_group: int = 1) -> list[dict[str, Any]]:
        """Rollouts of informative groups with their group-normalised advantage, whole groups up to the cap."""
        informative = []
        for g in groups:
            conts = trained(self, g)
            if self.cfg.group_size is not None and len(conts) > self.cfg.group_size:
                keep = sorted(rng.sample(range(len(conts)), self.cfg.group_size))
                conts = [conts[i] for i in keep]
            self.seen_groups += 1
            if len(conts) < self.cfg.min_group_size or len({c.reward for c in conts}) < 2:
                self.skipped_groups += 1
                continue
            informative.append((g, conts))
        out = []
        for k, (g, conts) in enumerate(take_groups(informative, self.cap(limit), rng)):
            rewards = torch.tensor([float(c.reward) for c in conts])
            adv = losses.grpo_advantages(rewards, len(conts), scale=self.cfg.scale_rewards)
            for c, a in zip(conts, adv.tolist()):
                out.append({**rollout(self, g, c, k), "advantage": a})
        return out

    @torch.no_grad()
    def precompute(self, examples: list[dict[str, Any]], policy: nn.Module, ref: nn.Module | None,
                   pad_id: int) -> None:
        """Old log-probs of the rollout policy; reference log-probs too when beta > 0 and precompute_ref."""
        if not examples:
            return
        self.token_pass(examples, policy, pad_id, "old_logps")
        if self.uses_reference and self.cfg.precompute_ref and ref is not None:
            self.token_pass(examples, ref, pad_id, "ref_logps")

    def loss(self, policy: nn.Module, batch: dict[str, torch.Tensor], ref: nn.Module | None,
             value_head: nn.Module | None = None, context: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        logps, _ = forward(policy, batch)
        mask = batch["loss_mask"]
        ref_logps = None
        if self.uses_reference:
            if "ref_logps" in batch:
                ref_logps = with_current(batch["ref_logps"], logps, mask)
            else:
                assert ref is not None, "GRPO with beta > 0 needs the reference model"
                with torch.no_grad():
                    ref_logps = forward(ref, batch)[0]
        old = with_current(batch["old_logps"], logps, mask)
        loss, m = losses.grpo_loss(logps, old, batch["advantage"].to(logps), mask, epsilon=self.cfg.epsilon,
                                   beta=self.cfg.beta, ref_logprobs=ref_logps)
        metrics = {k: v.item() for k, v in m.items()}
        metrics.update({"reward": batch["reward"].mean().item(), "skipped_groups": float(self.skipped_groups)})
        return loss, metrics
