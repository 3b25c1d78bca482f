"""Pairwise preference optimizers: DPO (and IPO, hinge, robust), SimPO, ORPO.

Each example is a pair sharing prompt + prefix: chosen = a correct continuation, rejected = an
incorrect one. Policy and reference log-probs are sums over the loss-masked tokens; the reference
ones are computed once when the round's data is built (`precompute_ref`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from gpo_exp import losses
from gpo_exp.registry import check
from gpo_exp.training.batching import pad_sequences, score_sequences, sequence_logps
from gpo_exp.training.objectives.base import (OPTIMIZERS, Group, Objective, OptimizerConfig,
                                              preference_pairs)


@dataclass
class DPOConfig(OptimizerConfig):
    name: str = "dpo"  # registry name
    beta: float = 0.1  # KL strength (DPO paper; TRL default 0.1)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust
    label_smoothing: float = 0.0  # robust only: assumed fraction of flipped labels, in [0, 0.5)
    rpo_alpha: float = 0.0  # weight of the chosen completion's per-token NLL added to the loss (RPO, Pang et al. 2024; TRL rpo_alpha); 0 = plain DPO
    dpop_lambda: float = 0.0  # DPO-Positive (Pal et al. 2024): penalty on the chosen log-ratio falling below 0, inside the margin (paper: 50); 0 = plain DPO

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "optimizer.beta", self.beta, "> 0")
        check(self.rpo_alpha >= 0, "optimizer.rpo_alpha", self.rpo_alpha, ">= 0")
        check(self.dpop_lambda >= 0, "optimizer.dpop_lambda", self.dpop_lambda, ">= 0")
        check(self.loss_type in losses.DPO_LOSS_TYPES, "optimizer.loss_type", self.loss_type,
              f"one of {', '.join(losses.DPO_LOSS_TYPES)}")


@dataclass
class IPOConfig(DPOConfig):
    name: str = "ipo"  # registry name
    loss_type: str = "ipo"  # IPO is DPO's pairs with the squared per-token loss

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.loss_type == "ipo", "optimizer.loss_type", self.loss_type, "ipo for optimizer=ipo (use dpo for others)")


@dataclass
class SimPOConfig(OptimizerConfig):
    name: str = "simpo"  # registry name
    lr: float = 1e-5  # AdamW learning rate
    beta: float = 2.0  # reward scale on average log-probs (SimPO paper: 2.0-2.5)
    gamma_beta_ratio: float = 0.5  # target margin gamma divided by beta (SimPO paper: 0.5)
    label_smoothing: float = 0.0  # conservative label smoothing, in [0, 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "optimizer.beta", self.beta, "> 0")


@dataclass
class ORPOConfig(OptimizerConfig):
    name: str = "orpo"  # registry name
    lam: float = 0.1  # lambda: weight of the odds-ratio term next to the NLL (ORPO paper / TRL beta: 0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.lam > 0, "optimizer.lam", self.lam, "> 0")


def _starts(examples: Sequence[dict[str, Any]]) -> list[int]:
    """Where each chosen, then each rejected, loss mask starts (a substituted trajectory's copied prefix
    is not trained, so the two may differ; `rejected_start` defaults to `start`)."""
    return [e["start"] for e in examples] + [e.get("rejected_start", e["start"]) for e in examples]


def _ends(examples: Sequence[dict[str, Any]]) -> list[int | None]:
    """Where each chosen, then each rejected, loss mask stops (optional keys; None: the sequence's end)."""
    return [e.get("chosen_end") for e in examples] + [e.get("rejected_end") for e in examples]


class PairObjective(Objective):
    """Shared data handling for pairwise losses; subclasses implement `pair_loss`."""

    kind = "pairs"

    def make_examples(self, groups: Sequence[Group], limit: int, rng: random.Random,
                      pairs_per_group: int = 1) -> list[dict[str, Any]]:
        out = []
        for g, c, r in preference_pairs(groups, limit, rng, pairs_per_group):
            head = g.prompt_ids + g.prefix_ids
            out.append({"chosen": head + c.ids, "rejected": head + r.ids, "start": self.start(g, c),
                        "rejected_start": self.start(g, r),
                        "prefix_len": len(g.prefix_ids), "uid": g.uid, "step": g.step})
        return out

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        batch = pad_sequences(seqs, _starts(examples), pad_id, _ends(examples))
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in examples] +
                                              [e["ref_logps"][1] for e in examples])
        return batch

    @torch.no_grad()
    def precompute(self, examples: list[dict[str, Any]], policy: nn.Module, ref: nn.Module | None,
                   pad_id: int) -> None:
        if ref is None or not self.uses_reference or not self.cfg.precompute_ref:
            return
        n = len(examples)
        scores = score_sequences(ref, [e["chosen"] for e in examples] + [e["rejected"] for e in examples],
                                 _starts(examples), pad_id, batch_size=4 * self.cfg.batch_size,
                                 ends=_ends(examples))
        for e, c, r in zip(examples, scores[:n], scores[n:]):
            e["ref_logps"] = (c, r)

    def reference_logps(self, batch: dict[str, torch.Tensor], ref: nn.Module | None) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        assert ref is not None, "a reference model is needed when reference log-probs are not precomputed"
        with torch.no_grad():
            return sequence_logps(ref, batch)[0]

    def loss(self, policy: nn.Module, batch: dict[str, torch.Tensor], ref: nn.Module | None,
             value_head: nn.Module | None = None, context: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        logps, lengths = sequence_logps(policy, batch)
        B = logps.shape[0] // 2
        per_ex, chosen_r, rejected_r, extra = self.pair_loss(logps, lengths, batch, ref, B)
        metrics = {
            "rewards/chosen": chosen_r.mean().item(),
            "rewards/rejected": rejected_r.mean().item(),
            "rewards/margins": (chosen_r - rejected_r).mean().item(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
            "logps/chosen": logps[:B].mean().item(),
            "logps/rejected": logps[B:].mean().item(),
            **extra,
        }
        return per_ex.mean(), metrics

    def pair_loss(self, logps: torch.Tensor, lengths: torch.Tensor, batch: dict[str, torch.Tensor],
                  ref: nn.Module | None, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        raise NotImplementedError


@OPTIMIZERS.register("dpo", DPOConfig)
@OPTIMIZERS.register("ipo", IPOConfig)
class DPO(PairObjective):
    """DPO and variants (`loss_type`); `ipo` is DPO with loss_type=ipo (conf/optimizer/ipo.yaml)."""

    cfg: DPOConfig

    def pair_loss(self, logps, lengths, batch, ref, B):
        ref_logps = self.reference_logps(batch, ref)
        pol = losses.dpo_logps_for(self.cfg.loss_type, logps, lengths)
        rl = losses.dpo_logps_for(self.cfg.loss_type, ref_logps, lengths)
        per_ex, cr, rr = losses.dpo_loss(pol[:B], pol[B:], rl[:B], rl[B:], beta=self.cfg.beta,
                                         loss_type=self.cfg.loss_type, label_smoothing=self.cfg.label_smoothing,
                                         dpop_lambda=self.cfg.dpop_lambda)
        kl = (logps - ref_logps).mean().item()  # mean sequence log-ratio policy/reference on the batch
        extra = {"kl": kl}
        if self.cfg.rpo_alpha > 0:  # RPO: keep the chosen (correct) reasoning likely while separating the pair
            nll = -(logps[:B] / lengths[:B].clamp(min=1))
            per_ex = per_ex + self.cfg.rpo_alpha * nll
            extra["nll_loss"] = nll.mean().item()
        return per_ex, cr, rr, extra


@OPTIMIZERS.register("simpo", SimPOConfig)
class SimPO(PairObjective):
    """SimPO: length-normalised log-probs with a target margin, no reference model."""

    cfg: SimPOConfig
    uses_reference = False

    def pair_loss(self, logps, lengths, batch, ref, B):
        avg = logps / lengths.clamp(min=1)
        per_ex, cr, rr = losses.simpo_loss(avg[:B], avg[B:], beta=self.cfg.beta,
                                           gamma_beta_ratio=self.cfg.gamma_beta_ratio,
                                           label_smoothing=self.cfg.label_smoothing)
        return per_ex, cr, rr, {}


@OPTIMIZERS.register("orpo", ORPOConfig)
class ORPO(PairObjective):
    """ORPO: NLL on the chosen completion plus lambda times the odds-ratio term, no reference model."""

    cfg: ORPOConfig
    uses_reference = False

    def pair_loss(self, logps, lengths, batch, ref, B):
        avg = logps / lengths.clamp(min=1)
        nll = -avg[:B]  # per-token NLL of each chosen completion
        per_ex, cr, rr, log_odds = losses.orpo_loss(avg[:B], avg[B:], nll, lam=self.cfg.lam)
        return per_ex, cr, rr, {"log_odds_ratio": log_odds.mean().item(), "nll_loss": nll.mean().item()}
