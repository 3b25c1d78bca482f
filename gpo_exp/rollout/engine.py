"""Batched sampling of continuations: deduplicated, length-bucketed, and reproducible per sample.

Each sample is addressed by (prefix tokens, sample index j). Its randomness comes from a counter-based
hash of (seed, prefix, j, position, token) turned into Gumbel noise, so a sample's tokens do not
depend on which other requests share its batch. That makes deduplication exact (identical requests
are generated once) and lets the engine sort requests by length into dense buckets freely.
(Up to float rounding: left padding, batch shape and the KV cache's layout move a row's logits by
~1e-7, which could flip a sampled token only on a near-exact tie of two perturbed scores, or, for
inverse-CDF sampling over a flat distribution of thousands of tokens, when the draw falls within that
distance of a CDF boundary; tests/test_engine.py checks the tokens are identical across batch sizes,
orders and padding, tests/test_engine_decoding.py that every cache layout and host-check schedule
draws the samples of the previous decoding loop.)

`RolloutEngine` is the interface; `HFRolloutEngine` runs any HF causal LM with a KV cache, and
rollout/vllm_engine.py puts vLLM behind the same `generate` (engine.backend=vllm).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
from tqdm.auto import tqdm
if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedModel

from gpo_exp.registry import check

log = logging.getLogger(__name__)
_MASK32 = 0xFFFFFFFF
VLLM_DTYPES = ("bfloat16", "float16", "float32", "auto")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHES = ("prealloc", "static", "dynamic")


@dataclass
class EngineConfig:
    backend: str = "hf"  # hf: batched HF forward passes with a KV cache, on the policy module itself | vllm: vLLM's offline engine (pip install -e ".[vllm]"), its own copy of the weights synced every round
    batch_size: int = 128  # sequences per generation batch (after length bucketing); hf only, vLLM schedules its own batches
    temperature: float = 1.0  # sampling temperature; 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass
    max_new_tokens: int | None = None  # None: the benchmark's max_new_tokens
    sort_by_length: bool = True  # bucket requests by prefix length so batches are densely packed (hf only)
    dedup: bool = True  # generate identical (prefix, sample index) requests once
    kv_cache: str = "prealloc"  # hf only. prealloc: buffers for prefix + max_new_tokens written in place, attention reads the filled columns | static: transformers' StaticCache, attention over every column (fixed shapes, for engine.compile) | dynamic: DynamicCache, grown by concatenation every token
    sync_every: int | None = None  # hf only: decoding steps between host checks for finished rows (each waits for the device); null: 1 on the CPU (a check costs nothing there), 8 on accelerators
    compact_below: float | None = None  # hf only: at a check, drop finished rows from the batch (one copy of the KV cache) once at most this share still runs; 0: never, 1: whenever a row finished; null: 1 on the CPU (finished rows would cost compute), 0.5 on accelerators
    dtype: str = "auto"  # hf only: dtype the engine computes in: auto (the policy's) | float32 | bfloat16 | float16; below the weights' dtype it autocasts (weights cast once per batch; sampling and log-probs in fp32)
    compile: bool = False  # hf only: torch.compile the decode step (set kv_cache=static too; on the CPU it needs a C++ compiler); compaction is then off, as every batch size is a new graph
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
        check(self.kv_cache in KV_CACHES, "engine.kv_cache", self.kv_cache, f"one of {', '.join(KV_CACHES)}")
        check(self.sync_every is None or self.sync_every >= 1, "engine.sync_every", self.sync_every, ">= 1 or null")
        check(self.compact_below is None or 0 <= self.compact_below <= 1, "engine.compact_below", self.compact_below,
              "in [0, 1] or null")
        check(self.dtype in ENGINE_DTYPES, "engine.dtype", self.dtype, f"one of {', '.join(ENGINE_DTYPES)}")
        check(not self.compile or self.kv_cache == "static", "engine.compile", self.compile,
              f"false with engine.kv_cache={self.kv_cache} (a compiled step needs engine.kv_cache=static: fixed shapes)")
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


def cdf_block(n: int) -> int:
    """Columns per block of the blocked CDF search: the largest power of two up to 256 dividing n (so the
    row is a free view), or 256 with zero padding when that is below 64 (e.g. GPT-2's 50257)."""
    b = 256
    while n % b:
        b //= 2
    return b if b >= 64 else 256


def search_cdf(probs: torch.Tensor, target: torch.Tensor, right: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `probs` (B, n): the first column whose CDF value exceeds `target` (right=True) or reaches
    it (right=False), and that CDF value (float64). Column order is the CDF's order; a zero-probability
    column is never returned for a target below the row's total.

    Up to 1024 columns this is one float64 cumulative sum. Wider rows (a vocabulary) take float64 block
    sums, their cumulative sum (n / block entries), and a cumulative sum inside the one block holding
    the target, so no scan runs over every column. Its CDF values differ from the sequential sum's
    only by float64 rounding (~1e-14), so the token found is the same but for a target that close to a
    boundary.
    """
    B, n = probs.shape
    tgt = target.to(torch.float64)[:, None]
    if n <= 1024:
        cdf = probs.double().cumsum(-1)
        i = torch.searchsorted(cdf, tgt, right=right).clamp(max=n - 1)
        return i.squeeze(1), cdf.gather(-1, i).squeeze(1)
    bs = cdf_block(n)
    nb = -(-n // bs)
    blocks = (probs if nb * bs == n else torch.nn.functional.pad(probs, (0, nb * bs - n))).view(B, nb, bs)
    bsum = blocks.sum(-1, dtype=torch.float64)
    bcdf = bsum.cumsum(-1)
    b = torch.searchsorted(bcdf, tgt, right=right).clamp(max=nb - 1)  # (B, 1): the block holding the target
    before = torch.cat([bcdf.new_zeros(B, 1), bcdf[:, :-1]], dim=1).gather(-1, b)
    blk = blocks.gather(1, b[:, :, None].expand(B, 1, bs)).squeeze(1)
    cdf = before + blk.double().cumsum(-1)
    j = torch.searchsorted(cdf, tgt, right=right)
    # A target past the block's own sum (rounding between the two summation orders) takes its last
    # nonzero column, never a zero-probability one after it.
    col = torch.arange(bs, device=probs.device)
    last_nz = torch.where(blk > 0, col, torch.zeros_like(col)).amax(-1, keepdim=True)
    j = torch.minimum(j, last_nz)
    return (b * bs + j).squeeze(1), cdf.gather(-1, j).squeeze(1)


def nucleus_candidates(probs: torch.Tensor, top_p: float) -> int:
    """How many of the highest probabilities to sort so that every row's top-p nucleus is among them.

    On the CPU a partial sort of 64, else 1024, usually holds it; checking that reads a value back,
    which costs nothing there. On an accelerator that read would stall the device every step, so
    the whole row is sorted instead (a segmented sort there costs a small part of a decoding step).
    """
    V = probs.shape[-1]
    if probs.device.type != "cpu":
        return V
    for k in (64, 1024):
        if k < V and bool((probs.topk(k, -1).values.sum(-1, dtype=torch.float64) >= top_p).all()):
            return k
    return V


def inverse_cdf(scores: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token whose CDF interval holds u, under softmax(scores) restricted to the top-p nucleus
    (the smallest highest-probability set whose mass reaches top_p); zero-probability tokens never win."""
    probs = scores.softmax(-1)
    order = None
    if top_p < 1.0:  # the nucleus ends at the first sorted token whose CDF reaches top_p
        probs, order = probs.topk(nucleus_candidates(probs, top_p), -1)  # sorted, descending
        _, mass = search_cdf(probs, torch.full_like(u, top_p), right=False)
    else:
        mass = probs.sum(-1, dtype=torch.float64)
    idx, _ = search_cdf(probs, u * mass, right=True)
    return order.gather(-1, idx[:, None]).squeeze(-1) if order is not None else idx


def choose_tokens(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float, top_p: float,
                  greedy: bool) -> torch.Tensor:
    """Sample one token per row from temperature-scaled, top-p-filtered logits, keyed per sample.

    Small vocabularies (the embedded char model) race Gumbel noise hashed per (key, step, token).
    Above GUMBEL_MAX_VOCAB that hash over every token costs more than the model's decoding step
    (~0.5 s for 48 rows x 49k tokens here), so one uniform per (key, step) picks the token by
    inverse CDF instead: the same distribution and the same per-sample reproducibility. Its CDF is
    searched by float64 block sums (search_cdf), not a scan over the vocabulary.
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


def preallocate(layer, width: int, dtype: torch.dtype | None) -> None:
    """Make a transformers DynamicLayer write its keys and values in place into buffers of `width` columns
    (allocated at its first update, in `dtype` or the states' own), its `keys`/`values` being views of
    the filled columns: no copy of the cache per token, and attention reads only what is written."""

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if getattr(layer, "kv_buffers", None) is None:
            B, H, _, _ = key_states.shape
            layer.kv_buffers = tuple(s.new_empty(B, H, width, s.shape[-1], dtype=dtype or s.dtype)
                                     for s in (key_states, value_states))
            layer.kv_filled = 0
            layer.device, layer.dtype, layer.is_initialized = key_states.device, layer.kv_buffers[0].dtype, True
        kb, vb = layer.kv_buffers
        start, end = layer.kv_filled, layer.kv_filled + key_states.shape[-2]
        kb[:, :, start:end] = key_states
        vb[:, :, start:end] = value_states
        layer.kv_filled = end
        layer.keys, layer.values = kb[:, :, :end], vb[:, :, :end]
        return layer.keys, layer.values

    layer.kv_buffers = None
    layer.update = update
    # What transformers' mask builder asks before it reads the padding mask back to the host (to drop
    # the mask when nothing is padded) at every decoding step; like a StaticCache, this layer says no.
    layer.is_compileable = True


def select_buffer_rows(layer, rows: torch.Tensor) -> None:
    """Batch rows `rows` of a preallocated layer (new buffers; only the filled columns are copied)."""
    n = layer.kv_filled
    new = []
    for buf in layer.kv_buffers:
        out = buf.new_empty(len(rows), *buf.shape[1:])
        out[:, :, :n] = buf[:, :, :n].index_select(0, rows)
        new.append(out)
    layer.kv_buffers = tuple(new)
    layer.keys, layer.values = new[0][:, :, :n], new[1][:, :, :n]


@dataclass
class HFRolloutEngine:
    """Generation with any HF causal LM: left-padded buckets, explicit position ids, a KV cache.

    Within a batch, identical prefixes (the K samples of one prefix) are prefilled once and their KV
    cache is copied to the K rows. The cache is preallocated for prefix + max_new_tokens and written
    in place (`kv_cache=prealloc`, or transformers' StaticCache with `static`), so a step copies nothing. Finished rows are found on the device;
    the host looks every `sync_every` steps, stops when all rows have finished, and compacts the
    finished rows out of the batch (one copy of the cache) once at most `compact_below` of it runs
    (by default every step and at once on the CPU, every 8 steps and at half on accelerators).
    Between checks finished rows keep decoding; their tokens after eos are dropped.
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

    def _compute_dtype(self) -> torch.dtype | None:
        """The dtype to autocast to, or None to run in the weights' own dtype."""
        weights = next(self.model.parameters()).dtype
        if self.cfg.dtype == "auto" or getattr(torch, self.cfg.dtype) == weights:
            return None
        want = getattr(torch, self.cfg.dtype)
        if want.itemsize > weights.itemsize:
            from gpo_exp.registry import ConfigError

            raise ConfigError(f"bad config engine.dtype={self.cfg.dtype!r}: the policy's weights are {weights}, and "
                              f"autocast only lowers precision (use auto or a dtype no wider than the weights')")
        if (want == torch.bfloat16 and self.model.device.type == "cpu" and not getattr(self, "_warned", False)
                and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            self._warned = True
            log.warning("engine.dtype=bfloat16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 "
                        "matmuls are emulated and usually slower than engine.dtype=float32")
        return want

    def _new_cache(self, width: int, amp: torch.dtype | None):  # -> transformers Cache
        from transformers import DynamicCache, StaticCache
        from transformers.cache_utils import DynamicLayer

        if self.cfg.kv_cache == "static":
            cache = StaticCache(config=self.model.config, max_cache_len=width)
        else:
            cache = DynamicCache(config=self.model.config)
        for layer in cache.layers:
            if self.cfg.kv_cache == "prealloc" and type(layer) is DynamicLayer:  # sliding-window layers keep growing
                preallocate(layer, width, amp)
            elif amp is not None:
                # Under autocast, rotary embeddings hand keys over in fp32 and values in the autocast dtype;
                # transformers < 5.24 sizes both static buffers from the keys, then fails to copy the values.
                # Store both in the autocast dtype, which the attention casts them to anyway.
                layer.update = (lambda k, v, *a, _update=layer.update, **kw:
                                _update(k.to(amp), v.to(amp), *a, **kw))
        return cache

    @staticmethod
    def _select_rows(cache, rows: torch.Tensor) -> None:
        """Keep (and repeat) the cache's batch rows `rows`, for every layer."""
        for layer in cache.layers:
            if getattr(layer, "kv_buffers", None) is not None:
                select_buffer_rows(layer, rows)
            elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)

    def _schedule(self, device: torch.device) -> tuple[int, float]:
        """(steps between host checks, running share at or below which to compact) for this device.
        On the CPU a check is free and a finished row's step is not, so both default to every time;
        on an accelerator a check drains its queue and a compaction copies the whole cache, so rarely.
        A compiled step never compacts: each new batch size would be a new graph."""
        cpu = device.type == "cpu"
        sync = self.cfg.sync_every or (1 if cpu else 8)
        compact = self.cfg.compact_below if self.cfg.compact_below is not None else (1.0 if cpu else 0.5)
        return sync, 0.0 if self.cfg.compile else compact

    def _step_fn(self):
        """The decode step: (tokens, positions, mask, cache) -> last-position logits; compiled once on request."""
        arg = kv_cache_arg()

        def step(tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                             **{arg: cache})
            return out.logits[:, -1]

        if not self.cfg.compile:
            return step
        if getattr(self, "_compiled", None) is None:
            if self.model.device.type == "cpu" and not any(
                    shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
                from gpo_exp.registry import ConfigError

                raise ConfigError("bad config engine.compile=True: torch.compile on the CPU needs a C++ compiler "
                                  "(none of $CXX, g++, clang++, c++ is on PATH); install one or set engine.compile=false")
            self._compiled = torch.compile(step, dynamic=True)
        return self._compiled

    def _row_limits(self, prefixes: Sequence[Sequence[int]], limit: int) -> list[int]:
        """New tokens each prefix may get: `limit`, or fewer where the model's context ends first (a
        continuation of a long prefix; position len(prefix) + t must stay inside the position table)."""
        from gpo_exp.models.checks import context_length

        ctx = context_length(self.model)
        if ctx is None:
            return [limit] * len(prefixes)
        if (over := next((p for p in prefixes if len(p) >= ctx), None)) is not None:
            raise ValueError(f"a prefix of {len(over)} tokens fills the model's context of {ctx} tokens: "
                             "nothing can be generated after it")
        return [min(limit, ctx - len(p)) for p in prefixes]

    @torch.no_grad()
    def _generate_batch(self, prefixes: list[tuple[int, ...]], keys: list[int], limit: int,
                        greedy: bool, temperature: float) -> list[Generation]:
        device = self.model.device
        amp = self._compute_dtype()
        limits = self._row_limits(prefixes, limit)
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            toks, lps = self._decode(prefixes, keys, limits, greedy, temperature, amp)
        gens = []
        for row, lp, cap in zip(toks.tolist(), lps.tolist(), limits):
            row = row[:cap]  # a row cut by the context ends there, unfinished
            finished = self.eos_id in row
            n = row.index(self.eos_id) + 1 if finished else cap
            gens.append(Generation(ids=row[:n], finished=finished, logprobs=lp[:n]))
        return gens

    def _decode(self, prefixes: list[tuple[int, ...]], keys: list[int], limits: list[int], greedy: bool,
                temperature: float, amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(new tokens, their log-probs), each (len(prefixes), max(limits)); a row's entries past its eos
        or its own limit are junk. A row that reaches its limit counts as done."""
        limit = max(limits)
        device = self.model.device
        static = self.cfg.kv_cache == "static"  # its attention spans every column, so the mask does too
        step = self._step_fn()
        # Prefill each distinct prefix once, then give every request row a copy of its prefix's cache.
        uniq: dict[tuple[int, ...], int] = {}
        src = [uniq.setdefault(p, len(uniq)) for p in prefixes]
        U, L = len(uniq), max(len(p) for p in uniq)
        width = L + limit  # cache columns: the left-padded prefixes, then one per new token
        ids = torch.full((U, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((U, width), dtype=torch.long)
        for r, p in enumerate(uniq):  # left padding: every row's next token sits at column L
            ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, L - len(p):L] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache(width, amp)
        out = self.model(input_ids=ids, attention_mask=mask if static else mask[:, :L], position_ids=pos,
                         use_cache=True, logits_to_keep=1, **{kv_cache_arg(): cache})
        logits = out.logits[:, -1]
        del out
        rows = torch.tensor(src, dtype=torch.long, device=device)
        if U < len(prefixes):
            self._select_rows(cache, rows)
        logits, mask, next_pos = logits[rows], mask[rows], pos[rows, -1] + 1
        key_t = torch.tensor(keys, dtype=torch.int64, device=device)
        B = len(prefixes)
        live = torch.arange(B, device=device)  # batch row -> request index
        done = torch.zeros(B, dtype=torch.bool, device=device)  # rows that have produced eos or reached their limit
        last = torch.tensor(limits, dtype=torch.long, device=device) - 1  # per row: the step of its last token
        toks = torch.full((B, limit), self.pad_id, dtype=torch.long, device=device)
        lps = torch.zeros((B, limit), dtype=torch.float32, device=device)
        sync_every, compact_below = self._schedule(device)
        for t in range(limit):
            tok = choose_tokens(logits, key_t, t, temperature, self.cfg.top_p, greedy)
            # the model's own log-prob of the chosen token (estimators read the policy's confidence from it)
            scores = logits.float()
            lp = scores.gather(-1, tok[:, None]).squeeze(1) - scores.logsumexp(-1)
            if len(live) == B:
                toks[:, t], lps[:, t] = tok, lp
            else:
                toks[live, t], lps[live, t] = tok, lp
            if t == limit - 1:
                break
            done |= (tok == self.eos_id) | (last <= t)
            if (t + 1) % sync_every == 0:  # the only host reads of the loop
                running = int((~done).sum())
                if running == 0:
                    break
                if running < len(live) and running <= compact_below * len(live):
                    keep = (~done).nonzero().squeeze(1)
                    self._select_rows(cache, keep)
                    live, key_t, mask, next_pos, tok, done, last = (live[keep], key_t[keep], mask[keep], next_pos[keep],
                                                                    tok[keep], done[keep], last[keep])
            mask[:, L + t] = 1
            logits = step(tok, next_pos, mask if static else mask[:, :L + t + 1], cache)
            next_pos = next_pos + (~done).long()  # a done row decodes junk until compacted, at a fixed position: never past the context
        return toks, lps
