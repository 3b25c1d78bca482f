"""Right-padded batches of (prompt + completion) token sequences and their per-token log-probs.

Log-prob code uses right padding: a plain forward pass (unlike `generate`) does not fix positions
for left padding. `loss_mask` marks the completion tokens a loss should count.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedModel


def pad_sequences(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                  ends: Sequence[int | None] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `seqs`; loss_mask is 1 on tokens starts[i] <= index < ends[i] (default: to the end)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[i, : len(s)] = 1
        end = len(s) if ends is None or ends[i] is None else min(ends[i], len(s))
        loss[i, st: end] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def token_logps(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape (B, T); column 0 is 0 (no prediction for it)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logps, (1, 0))


def sequence_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's masked tokens, and the number of those tokens."""
    logps = token_logps(model, batch["input_ids"], batch["attention_mask"]) * batch["loss_mask"]
    return logps.sum(-1), batch["loss_mask"].sum(-1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model runs: HF models and the LoRA reference say so; otherwise its first parameter's device."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                    batch_size: int = 32, ends: Sequence[int | None] | None = None) -> list[float]:
    """Summed log-prob of each sequence's tokens from `starts[i]` on (to `ends[i]` if given), for a
    frozen model (no gradient).

    Built for the one-off reference pass over a round's data: identical (sequence, start, end) are
    scored once (a chosen continuation shared by several pairs, say), and sequences are sorted by
    length before batching, so little compute goes to padding. Without gradients a forward keeps no
    activations, so callers pass twice the sequences of a training step: fewer, fuller batches.
    """
    ends = ends if ends is not None else [None] * len(seqs)
    keys = [(tuple(s), st, en) for s, st, en in zip(seqs, starts, ends)]
    uniq = sorted(set(keys), key=lambda k: len(k[0]))
    device = model_device(model)
    scores: dict[tuple[tuple[int, ...], int, int | None], float] = {}
    for i in range(0, len(uniq), batch_size):
        chunk = uniq[i: i + batch_size]
        batch = pad_sequences([k[0] for k in chunk], [k[1] for k in chunk], pad_id, [k[2] for k in chunk])
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        scores.update(zip(chunk, logps.tolist()))
    return [scores[k] for k in keys]
