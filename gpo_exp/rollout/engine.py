"""Batched sampling of continuations: deduplicated, length-bucketed, and reproducible per sample.

Each sample is addressed by (prefix tokens, sample index j). Its randomness comes from a counter-based
hash of (seed, prefix, j, position, token) turned into Gumbel noise, so a sample's tokens do not
depend on which other requests share its batch. That makes deduplication exact (identical requests
are generated once) and lets the engine sort requests by length into dense buckets freely.
(Up to float rounding: left padding and batch shape move a row's logits by ~1e-7, which could flip a
sampled token only on a near-exact tie of two perturbed scores; tests/test_engine.py checks the
tokens are identical across batch sizes, orders and padding.)

`RolloutEngine` is the interface; `HFRolloutEngine` runs any HF causal LM with a KV cache, and
rollout/vllm_engine.py puts vLLM behind the same `generate` (engine.backend=vllm).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
from tqdm.auto import tqdm
if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedModel

from gpo_exp.registry import check

_MASK32 = 0xFFFFFFFF
VLLM_DTYPES = ("bfloat16", "float16", "float32", "auto")


@dataclass
class EngineConfig:
    backend: str = "hf"  # hf: batched HF forward passes with a KV cache, on the policy module itself | vllm: vLLM's offline engine (pip install -e ".[vllm]"), its own copy of the weights synced every round
    batch_size: int = 128  # sequences per generation batch (after length bucketing); hf only, vLLM schedules its own batches
    temperature: float = 1.0  # sampling temperature; 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass
    max_new_tokens: int | None = None  # None: the benchmark's max_new_tokens
    sort_by_length: bool = True  # bucket requests by prefix length so batches are densely packed (hf only)
    dedup: bool = True  # generate identical (prefix, sample index) requests once
    # engine.backend=vllm only (rollout/vllm_engine.py):
    gpu_memory_utilization: float = 0.3  # share of the GPU's memory vLLM reserves for its weights and KV cache; the rest stays with the trainer on the same GPU
    sleep_mode: bool = False  # free vLLM's GPU memory while the policy trains (LoRA: weights parked in CPU memory; full fine-tuning: dropped, then re-sent from the policy), at the cost of a wake-up per round
    tensor_parallel_size: int = 1  # GPUs one vLLM engine shards the model over; with trainer.devices > 1 every rank runs its own engine, so 1
    vllm_dtype: str = "bfloat16"  # dtype of vLLM's weights and activations: bfloat16 | float16 | float32 | auto (the checkpoint's)
    max_model_len: int | None = None  # longest sequence vLLM's KV cache must hold; null: the run's longest prompt + 2 x max_new_tokens (a continuation of the longest prefix), capped at the model's context
    enforce_eager: bool = False  # no CUDA graphs in vLLM: a faster engine start, slower decoding
    lora_sync: str = "adapter"  # LoRA policies: adapter (save it, a new LoRARequest each round) | merged (merge it into the base weights, load those in place: no LoRA kernels while decoding)
    allow_other_vllm: bool = False  # run on an installed vLLM other than the version this backend was written against (0.33.0), with a warning instead of stopping

    def __post_init__(self) -> None:
        check(self.backend in ("hf", "vllm"), "engine.backend", self.backend, "hf or vllm")
        check(self.batch_size >= 1, "engine.batch_size", self.batch_size, ">= 1")
        check(self.temperature >= 0, "engine.temperature", self.temperature, ">= 0")
        check(0 < self.top_p <= 1, "engine.top_p", self.top_p, "in (0, 1]")
        check(self.max_new_tokens is None or self.max_new_tokens >= 1, "engine.max_new_tokens",
              self.max_new_tokens, ">= 1 or null")
        check(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization", self.gpu_memory_utilization,
              "in (0, 1]")
        check(self.tensor_parallel_size >= 1, "engine.tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        check(self.vllm_dtype in VLLM_DTYPES, "engine.vllm_dtype", self.vllm_dtype, f"one of {', '.join(VLLM_DTYPES)}")
        check(self.max_model_len is None or self.max_model_len >= 1, "engine.max_model_len", self.max_model_len,
              ">= 1 or null")
        check(self.lora_sync in ("adapter", "merged"), "engine.lora_sync", self.lora_sync, "adapter or merged")


@dataclass
class Generation:
    ids: list[int]  # new tokens, eos included when the model stopped
    finished: bool  # False when max_new_tokens cut it off
    logprobs: list[float] = field(default_factory=list)  # log p(token | context) of each new token under the model (temperature 1, no top-p)


@dataclass
class EngineStats:
    generated_tokens: int = 0  # new tokens produced (after deduplication), all calls so far
    requests: int = 0  # samples asked for
    generated: int = 0  # samples actually generated (requests minus duplicates)
    seconds: float = 0.0


class RolloutEngine(Protocol):
    stats: EngineStats

    def generate(self, prefixes: Sequence[Sequence[int]], sample_ids: Sequence[int], *, seed: int,
                 greedy: bool = False, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        """One generation per (prefix, sample id); sample (prefix, j, seed) is reproducible.
        `temperature` overrides the configured one for this call (None: the config's). Each Generation
        carries its tokens' log-probs under the untempered model (vLLM: `logprobs=0`); the confidence
        prior of the estimators reads them."""
        ...


def kv_cache_arg() -> str:
    """The name under which HF causal LMs take and return their KV cache: `cache` from transformers 5.24
    on, `past_key_values` before (5.24 still accepts the old name, with a deprecation warning)."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2**32."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sample_keys(prefixes: Sequence[Sequence[int]], sample_ids: Sequence[int], seed: int) -> list[int]:
    """A 32-bit key per (prefix, sample id, seed); Python's tuple-of-int hash is stable across runs."""
    return [hash((seed, tuple(p), j)) & _MASK32 for p, j in zip(prefixes, sample_ids)]


def plan_requests(prefixes: Sequence[Sequence[int]], sample_ids: Sequence[int], seed: int, greedy: bool,
                  dedup: bool) -> tuple[list[tuple[int, tuple[int, ...]]], list[int]]:
    """(distinct requests as (sample key, prefix), the request each input row reads its generation from).

    Identical (prefix, j) requests share one generation when `dedup` (exact: a sample is a function of
    its key). Greedy requests all use j = 0, so the K greedy samples of a prefix are one generation.
    Every backend plans its requests here, so they deduplicate and seed alike."""
    keys = sample_keys(prefixes, [0 if greedy else j for j in sample_ids], seed)
    todo: list[tuple[int, tuple[int, ...]]] = []
    index: dict[tuple[int, tuple[int, ...]], int] = {}
    slot = []
    for p, k in zip(prefixes, keys):
        req = (k, tuple(p))
        if req not in index or not dedup:
            index[req] = len(todo)
            todo.append(req)
        slot.append(index[req])
    return todo, slot


def resolve_call(cfg: EngineConfig, default_max_new_tokens: int, prefixes: Sequence[Sequence[int]],
                 sample_ids: Sequence[int], seed: int, greedy: bool, max_new_tokens: int | None,
                 temperature: float | None) -> tuple[float, int, bool, list[tuple[int, tuple[int, ...]]], list[int]]:
    """One generate call's (temperature, token limit, greedy, requests, slots), resolved alike by every
    backend: the call's overrides over the config's, greedy at temperature 0, requests from plan_requests."""
    temperature = cfg.temperature if temperature is None else temperature
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token (e.g. the prompt's BOS)")
    limit = max_new_tokens or cfg.max_new_tokens or default_max_new_tokens
    greedy = greedy or temperature == 0  # greedy samples of one prefix are all the same sample
    return (temperature, limit, greedy, *plan_requests(prefixes, sample_ids, seed, greedy, cfg.dedup))


def gumbel_at(keys: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for each (key, token) pair of the broadcast `keys` and `tokens`: a pure
    function of (key, step, token), so any subset of a row's tokens gets the values the full row would.

    int64 products may wrap past 2**63; the wrap is modulo 2**64, so the low 32 bits kept are exact.
    """
    h = _mix32((keys * 0x9E3779B1 + step * 0x85EBCA77 + tokens * 0xC2B2AE3D) & _MASK32)
    h = _mix32(h ^ (keys & _MASK32))
    u = (h.to(torch.float64) + 0.5) / 2**32
    return (-torch.log(-torch.log(u))).to(torch.float32)


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (len(keys), vocab), a pure function of (key, step, token)."""
    tok = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    return gumbel_at(keys[:, None], step, tok[None, :])


GUMBEL_MAX_VOCAB = 4096  # larger vocabularies sample by inverse CDF: one hash per row, not one per token


def uniform_at(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One U(0, 1) draw (float64) per key at decoding step `step`, a pure function of (key, step)."""
    h = _mix32((keys * 0x9E3779B1 + step * 0x85EBCA77 + 0x27D4EB2F) & _MASK32)
    return (_mix32(h ^ (keys & _MASK32)).to(torch.float64) + 0.5) / 2**32


def inverse_cdf(scores: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token whose CDF interval holds u, under softmax(scores) restricted to the top-p nucleus
    (the smallest highest-probability set whose mass reaches top_p); zero-probability tokens never win."""
    probs = scores.softmax(-1)
    order = None
    if top_p < 1.0:  # the nucleus is usually in the top few dozen tokens: a partial sort finds it
        for k in (64, 1024, probs.shape[-1]):
            top, order = probs.topk(min(k, probs.shape[-1]), -1)  # sorted, descending
            if k >= probs.shape[-1] or bool((top.double().sum(-1) >= top_p).all()):
                break
        probs = top
    cdf = probs.double().cumsum(-1)
    if top_p < 1.0:  # the nucleus ends at the first token whose CDF reaches top_p
        last = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], top_p)).clamp(max=cdf.shape[-1] - 1)
        mass = cdf.gather(-1, last)
    else:
        mass = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u[:, None] * mass, right=True).clamp(max=cdf.shape[-1] - 1)
    return (order.gather(-1, idx) if order is not None else idx).squeeze(-1)


def choose_tokens(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float, top_p: float,
                  greedy: bool) -> torch.Tensor:
    """Sample one token per row from temperature-scaled, top-p-filtered logits, keyed per sample.

    Small vocabularies (the embedded char model) race Gumbel noise hashed per (key, step, token).
    Above GUMBEL_MAX_VOCAB that hash over every token costs more than the model's decoding step
    (~0.5 s for 48 rows x 49k tokens here), so one uniform per (key, step) picks the token by
    inverse CDF instead: the same distribution and the same per-sample reproducibility.
    """
    if greedy or temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    keys = keys.to(scores.device)
    if scores.shape[-1] > GUMBEL_MAX_VOCAB:
        return inverse_cdf(scores, uniform_at(keys, step), top_p)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest set whose mass reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -math.inf))
    return (scores + gumbel_noise(keys, step, scores.shape[-1])).argmax(-1)


@dataclass
class HFRolloutEngine:
    """Generation with any HF causal LM: left-padded buckets, explicit position ids, a KV cache.

    Within a batch, identical prefixes (the K samples of one prefix) are prefilled once and their KV
    cache is copied to the K rows, and rows that have finished are compacted out of the batch, so
    late decoding steps only compute the rows still running.
    """

    model: PreTrainedModel
    eos_id: int
    pad_id: int
    cfg: EngineConfig = field(default_factory=EngineConfig)
    default_max_new_tokens: int = 64
    stats: EngineStats = field(default_factory=EngineStats)
    progress: bool = False  # a progress bar over batches for calls with several of them

    def generate(self, prefixes: Sequence[Sequence[int]], sample_ids: Sequence[int], *, seed: int,
                 greedy: bool = False, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        t0 = time.perf_counter()
        temperature, limit, greedy, todo, slot = resolve_call(self.cfg, self.default_max_new_tokens, prefixes,
                                                              sample_ids, seed, greedy, max_new_tokens, temperature)
        order = list(range(len(todo)))
        if self.cfg.sort_by_length:  # (length, tokens): the samples of one prefix land in one batch
            order.sort(key=lambda i: (len(todo[i][1]), todo[i][1]))
        results: list[Generation | None] = [None] * len(todo)
        was_training = self.model.training
        self.model.eval()
        try:
            starts = range(0, len(order), self.cfg.batch_size)
            for b in tqdm(starts, desc="generate", unit="batch", leave=False, disable=not self.progress or len(starts) < 4):
                idx = order[b: b + self.cfg.batch_size]
                gens = self._generate_batch([todo[i][1] for i in idx], [todo[i][0] for i in idx], limit, greedy,
                                             temperature)
                for i, g in zip(idx, gens):
                    results[i] = g
        finally:
            self.model.train(was_training)
        # Copies, so a caller editing one duplicate's ids does not edit the others.
        out = [Generation(ids=list(results[s].ids), finished=results[s].finished,  # type: ignore[union-attr]
                          logprobs=list(results[s].logprobs)) for s in slot]  # type: ignore[union-attr]
        self.stats.requests += len(prefixes)
        self.stats.generated += len(todo)
        self.stats.generated_tokens += sum(len(g.ids) for g in results if g is not None)
        self.stats.seconds += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def _generate_batch(self, prefixes: list[tuple[int, ...]], keys: list[int], limit: int,
                        greedy: bool, temperature: float) -> list[Generation]:
        device = self.model.device
        # Prefill each distinct prefix once, then give every request row a copy of its prefix's cache.
        uniq: dict[tuple[int, ...], int] = {}
        src = [uniq.setdefault(p, len(uniq)) for p in prefixes]
        U, L = len(uniq), max(len(p) for p in uniq)
        ids = torch.full((U, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((U, L), dtype=torch.long)
        for r, p in enumerate(uniq):  # left padding: every row's next token sits at column L
            ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, L - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache_arg = kv_cache_arg()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = getattr(out, cache_arg), out.logits[:, -1]
        rows = torch.tensor(src, dtype=torch.long, device=device)
        if U < len(prefixes):
            cache.batch_select_indices(rows)
        logits, mask, next_pos = logits[rows], mask[rows], pos[rows, -1] + 1
        key_t = torch.tensor(keys, dtype=torch.int64, device=device)
        live = torch.arange(len(prefixes), device=device)  # batch row -> request index, for rows still running
        toks = torch.full((len(prefixes), limit), self.pad_id, dtype=torch.long, device=device)
        lps = torch.zeros((len(prefixes), limit), dtype=torch.float32, device=device)
        for t in range(limit):
            tok = choose_tokens(logits, key_t, t, temperature, self.cfg.top_p, greedy)
            toks[live, t] = tok
            # the model's own log-prob of the chosen token (estimators read the policy's confidence from it)
            scores = logits.float()
            lps[live, t] = scores.gather(-1, tok[:, None]).squeeze(1) - scores.logsumexp(-1)
            if t == limit - 1:
                break
            going = tok != self.eos_id
            n_going = int(going.sum())
            if n_going == 0:
                break
            if n_going < len(live):  # compact finished rows out of the batch (and its KV cache)
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, key_t, mask, next_pos, tok = live[keep], key_t[keep], mask[keep], next_pos[keep], tok[keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             use_cache=True, **{cache_arg: cache})
            cache, logits = getattr(out, cache_arg), out.logits[:, -1]
            next_pos = next_pos + 1
        gens = []
        for row, lp in zip(toks.tolist(), lps.tolist()):
            finished = self.eos_id in row
            n = row.index(self.eos_id) + 1 if finished else limit
            gens.append(Generation(ids=row[:n], finished=finished, logprobs=lp[:n]))
        return gens
