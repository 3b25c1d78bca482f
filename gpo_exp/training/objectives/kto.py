"""KTO: unpaired desirable / undesirable completions against a batch-level KL reference point.

Examples come from the same preference pairs as DPO (a correct and an incorrect continuation of one
shared prefix), each pair split into one desirable and one undesirable example, so `limit` pairs give
2 * limit examples and KTO trains on the same sequences as DPO.

The KL reference point z0 (Ethayarajh et al. 2024, Eq. 7) is estimated on mismatched (context,
completion) pairs of the training batch (`losses.kto_mismatched_indices`): context i with the
completion of example (i-1) % B. The DataLoader forms (shuffled) batches only after `precompute`, so
those pairs do not exist when the round's data is built; both the policy's and the reference's KL
log-probs are therefore computed in `loss`, without gradient (z0 is detached in the loss).
`precompute_ref` covers the reference log-probs of the examples themselves. A batch of one has no
mismatched pair: z0 is then 0 (its clamp floor).
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
from gpo_exp.training.objectives.base import OPTIMIZERS, Group, Objective, OptimizerConfig, preference_pairs


@dataclass
class KTOConfig(OptimizerConfig):
    name: str = "kto"  # registry name
    lr: float = 1e-5  # AdamW learning rate
    beta: float = 0.1  # KL strength (KTO paper; TRL default 0.1)
    desirable_weight: float = 1.0  # lambda_D: weight of desirable (correct) examples
    undesirable_weight: float = 1.0  # lambda_U: weight of undesirable (incorrect) examples

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "optimizer.beta", self.beta, "> 0")
        check(self.desirable_weight > 0, "optimizer.desirable_weight", self.desirable_weight, "> 0")
        check(self.undesirable_weight > 0, "optimizer.undesirable_weight", self.undesirable_weight, "> 0")
        check(self.batch_size >= 2, "optimizer.batch_size", self.batch_size, ">= 2 (the KL estimate pairs examples)")


def kl_sequences(seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[int]]:
    """Mismatched sequences for the KL estimate: context i (tokens before starts[i]) + completion (i-1) % B.

    Each is cut to the longest input sequence so a long context plus a long foreign completion
    never exceeds what the model has already been shown to fit.
    """
    cap = max(len(s) for s in seqs)
    idx = losses.kto_mismatched_indices(len(seqs)).tolist()
    return [(list(seqs[i][: starts[i]]) + list(seqs[j][starts[j]:]))[:cap] for i, j in enumerate(idx)]


@OPTIMIZERS.register("kto", KTOConfig)
class KTO(Objective):
    """KTO (Ethayarajh et al. 2024) on correct (desirable) / incorrect (undesirable) continuations."""

    cfg: KTOConfig
    kind = "unpaired"

    def make_examples(self, groups: Sequence[Group], limit: int, rng: random.Random,
                      pairs_per_group: int = 1) -> list[dict[str, Any]]:
        """Two examples per preference pair (desirable first): `limit` pairs -> at most 2 * limit examples."""
        out = []
        for g, c, r in preference_pairs(groups, limit, rng, pairs_per_group):
            head = g.prompt_ids + g.prefix_ids
            for cont, desirable in ((c, True), (r, False)):
                out.append({"ids": head + cont.ids, "desirable": desirable, "start": self.start(g, cont),
                            "prefix_len": len(g.prefix_ids), "uid": g.uid, "step": g.step})
        return out

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        seqs, starts = [e["ids"] for e in examples], [e["start"] for e in examples]
        batch = pad_sequences(seqs, starts, pad_id)
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        if len(examples) >= 2:
            kl = pad_sequences(kl_sequences(seqs, starts), starts, pad_id)
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    def collate_step(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """Micro-batches without the KL sequences; the KL batch of the *whole* step is kept once, so
        the reference point z0 (a batch statistic) is the same as without micro-batches."""
        step = super().collate_step(examples, pad_id)
        if len(step["micro"]) > 1:
            full = self.collate(examples, pad_id)
            step["kl"] = {k[3:]: v for k, v in full.items() if k.startswith("kl_")}
            step["micro"] = [{k: v for k, v in p.items() if not k.startswith("kl_")} for p in step["micro"]]
        return step

    def step_context(self, policy: nn.Module, ref: nn.Module | None, step: dict[str, Any]) -> Any:
        """(policy, reference) summed log-probs of the step's KL sequences, micro-batch by micro-batch."""
        if "kl" not in step:
            return None
        assert ref is not None, "KTO needs the reference model"
        kl, m = step["kl"], self.cfg.micro_batch_size or len(step["kl"]["input_ids"])
        parts = [{k: v[i: i + m] for k, v in kl.items()} for i in range(0, len(kl["input_ids"]), m)]
        with torch.no_grad():
            return (torch.cat([sequence_logps(policy, p)[0] for p in parts]),
                    torch.cat([sequence_logps(ref, p)[0] for p in parts]))

    @torch.no_grad()
    def precompute(self, examples: list[dict[str, Any]], policy: nn.Module, ref: nn.Module | None,
                   pad_id: int) -> None:
        if ref is None or not self.cfg.precompute_ref:
            return
        scores = score_sequences(ref, [e["ids"] for e in examples], [e["start"] for e in examples], pad_id,
                                 batch_size=2 * self.cfg.batch_size)
        for e, lp in zip(examples, scores):
            e["ref_logps"] = lp

    def _kl_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probs of the mismatched KL sequences, without gradient."""
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        with torch.no_grad():
            return sequence_logps(model, kl_batch)[0]

    def loss(self, policy: nn.Module, batch: dict[str, torch.Tensor], ref: nn.Module | None,
             value_head: nn.Module | None = None, context: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        assert ref is not None, "KTO needs the reference model"
        logps, _ = sequence_logps(policy, batch)
        if "ref_logps" in batch:
            ref_logps = batch["ref_logps"].to(logps)
        else:
            with torch.no_grad():
                ref_logps = sequence_logps(ref, batch)[0]
        if context is not None:  # micro-batch: the whole step's KL log-probs (step_context)
            policy_kl, ref_kl = context
        elif "kl_input_ids" in batch:
            policy_kl, ref_kl = self._kl_logps(policy, batch), self._kl_logps(ref, batch)
        else:  # a batch of one has no mismatched pair: z0 = 0
            policy_kl = ref_kl = torch.zeros(1, device=logps.device)
        desirable = batch["desirable"].to(logps.device)
        per_ex, rewards, kl = losses.kto_loss(
            logps, ref_logps, desirable, policy_kl, ref_kl, beta=self.cfg.beta,
            desirable_weight=self.cfg.desirable_weight, undesirable_weight=self.cfg.undesirable_weight)
        return per_ex.mean(), kto_metrics(logps.detach(), rewards, desirable, kl)


def kto_metrics(logps: torch.Tensor, rewards: torch.Tensor, desirable: torch.Tensor,
                kl: torch.Tensor) -> dict[str, float]:
    """TRL's KTO metric names, over whichever of desirable / undesirable the batch holds (never NaN)."""
    metrics = {"kl": kl.item()}
    for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
        if sel.any():
            metrics[f"rewards/{name}"] = rewards[sel].mean().item()
            metrics[f"logps/{name}"] = logps[sel].mean().item()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
