"""The HF engine's decoding loop as it was before the preallocated cache (a frozen copy, the oracle of
tests/test_engine_decoding.py): a DynamicCache grown by concatenation, a host check after every token,
finished rows compacted out at once, and inverse-CDF sampling by a float64 cumulative sum over the
whole vocabulary. Only the cache argument's name follows the installed transformers."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from gpo_exp.rollout.engine import (GUMBEL_MAX_VOCAB, EngineConfig, Generation, gumbel_noise, kv_cache_arg,
                                    resolve_call, uniform_at)


def inverse_cdf(scores: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    probs = scores.softmax(-1)
    order = None
    if top_p < 1.0:
        for k in (64, 1024, probs.shape[-1]):
            top, order = probs.topk(min(k, probs.shape[-1]), -1)
            if k >= probs.shape[-1] or bool((top.double().sum(-1) >= top_p).all()):
                break
        probs = top
    cdf = probs.double().cumsum(-1)
    if top_p < 1.0:
        last = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], top_p)).clamp(max=cdf.shape[-1] - 1)
        mass = cdf.gather(-1, last)
    else:
        mass = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None] * mass, right=True).clamp(max=cdf.shape[-1] - 1)
    return (order.gather(-1, idx) if order is not None else idx).squeeze(-1)


def choose_tokens(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float, top_p: float,
                  greedy: bool) -> torch.Tensor:
    if greedy or temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if scores.shape[-1] > GUMBEL_MAX_VOCAB:
        return inverse_cdf(scores, uniform_at(keys, step), top_p)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
    return (scores + gumbel_noise(keys, step, scores.shape[-1])).argmax(-1)


@torch.no_grad()
def generate_batch(model, eos_id: int, pad_id: int, top_p: float, prefixes: list[tuple[int, ...]], keys: list[int],
                   limit: int, greedy: bool, temperature: float) -> list[Generation]:
    arg = kv_cache_arg()
    uniq: dict[tuple[int, ...], int] = {}
    src = [uniq.setdefault(p, len(uniq)) for p in prefixes]
    U, L = len(uniq), max(len(p) for p in uniq)
    ids = torch.full((U, L), pad_id, dtype=torch.long)
    mask = torch.zeros((U, L), dtype=torch.long)
    for r, p in enumerate(uniq):
        ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits = getattr(out, arg), out.logits[:, -1]
    rows = torch.tensor(src, dtype=torch.long)
    if U < len(prefixes):
        cache.batch_select_indices(rows)
    logits, mask, next_pos = logits[rows], mask[rows], pos[rows, -1] + 1
    key_t = torch.tensor(keys, dtype=torch.int64)
    live = torch.arange(len(prefixes))
    toks = torch.full((len(prefixes), limit), pad_id, dtype=torch.long)
    lps = torch.zeros((len(prefixes), limit), dtype=torch.float32)
    for t in range(limit):
        tok = choose_tokens(logits, key_t, t, temperature, top_p, greedy)
        toks[live, t] = tok
        scores = logits.float()
        lps[live, t] = scores.gather(-1, tok[:, None]).squeeze(1) - scores.logsumexp(-1)
        if t == limit - 1:
            break
        going = tok != eos_id
        n_going = int(going.sum())
        if n_going == 0:
            break
        if n_going < len(live):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, key_t, mask, next_pos, tok = live[keep], key_t[keep], mask[keep], next_pos[keep], tok[keep]
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                    **{arg: cache})
        cache, logits = getattr(out, arg), out.logits[:, -1]
        next_pos = next_pos + 1
    gens = []
    for row, lp in zip(toks.tolist(), lps.tolist()):
        finished = eos_id in row
        n = row.index(eos_id) + 1 if finished else limit
        gens.append(Generation(ids=row[:n], finished=finished, logprobs=lp[:n]))
    return gens


def generate(model, eos_id: int, pad_id: int, cfg: EngineConfig, default_max_new_tokens: int,
             prefixes: Sequence[Sequence[int]], sample_ids: Sequence[int], seed: int,
             greedy: bool = False) -> list[Generation]:
    """HFRolloutEngine.generate of the same revision: same planning, bucketing and batches."""
    temperature, limit, greedy, todo, slot = resolve_call(cfg, default_max_new_tokens, prefixes, sample_ids, seed,
                                                          greedy, None, None)
    order = list(range(len(todo)))
    if cfg.sort_by_length:
        order.sort(key=lambda i: (len(todo[i][1]), todo[i][1]))
    results: list[Generation | None] = [None] * len(todo)
    model.eval()
    for b in range(0, len(order), cfg.batch_size):
        idx = order[b: b + cfg.batch_size]
        gens = generate_batch(model, eos_id, pad_id, cfg.top_p, [todo[i][1] for i in idx], [todo[i][0] for i in idx],
                              limit, greedy, temperature)
        for i, g in zip(idx, gens):
            results[i] = g
    return [results[s] for s in slot]  # type: ignore[misc]
