"""engine.backend=vllm: the `RolloutEngine` protocol on vLLM's offline `LLM` API, written against vLLM 0.33.0.

vllm is imported only when the engine starts, so config validation and every other backend never
import it. What the contract needs, and where vLLM 0.33.0 provides it (paths inside its wheel):
  - Per-sample seeds. One request per distinct (prefix, sample index j), planned by the HF engine's
    `plan_requests`, with `SamplingParams(seed=key)`, key = `sample_keys(prefix, j, seed)`. vLLM gives
    a seeded request its own torch.Generator, so a draw does not depend on the batch it lands in.
    The draws are vLLM's, not the HF engine's: the two backends sample different continuations.
    (`n=K` with one seed would tie the K samples of a prefix together, so j is one request each.)
  - Untempered log-probs. `logprobs=0` returns the sampled token's log-prob and
    `logprobs_mode="raw_logprobs"` computes it from the model's logits before temperature, penalties
    and top-p (config/model.py `ModelConfig.logprobs_mode`; v1/sample/sampler.py `Sampler.forward`,
    "raw_logprobs" -> `compute_logprobs(logits)` ahead of `apply_logits_processors` and `sample`;
    the "processed_*" modes are taken after temperature and top-k/top-p). The default is already
    raw_logprobs; it is set explicitly so a changed default cannot change the estimators' prior.
  - Stop at eos. The engine starts without a tokenizer (token ids in and out), so eos is given as
    `stop_token_ids`; the stop token stays in `token_ids` (v1/core/sched/scheduler.py
    `_update_request_with_output` trims only after it) and `finish_reason` is "stop"; "length"
    means max_tokens cut the sample off.
  - `enable_prefix_caching=True`: GPO's continuations share their prefixes.

Placement:
  - One process (trainer.devices=1), tensor_parallel_size=1: the engine core runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), so an in-place weight sync hands vLLM the policy's tensors by
    reference (`collective_rpc("reload_weights", ...)` reaches the worker directly).
  - Data parallel (trainer.devices > 1): every rank starts its own engine on its own GPU with
    `distributed_executor_backend="external_launcher"`, inside the DDP process group Lightning
    already set up (as TRL's colocate mode and verl do). With tensor_parallel_size=1 each rank is its
    own replica (distributed/parallel_state.py `initialize_model_parallel`: "ExternalDP ... every dp
    rank can generate independently") and generates its shard of the round. vLLM builds its groups
    with collectives, so every rank starts its engine in the same hook (`follow_policy` at fit start).
  - tensor_parallel_size > 1 (one process): vLLM's own worker processes; LoRA adapters only, since an
    in-place sync would have to ship the tensors to those processes (not implemented).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from gpo_exp.models.lora import is_lora
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.engine import EngineConfig, EngineStats, Generation, resolve_call

log = logging.getLogger(__name__)

VLLM_VERSION = "0.33.0"  # the vLLM this backend was written against (pyproject's [vllm] extra pins it)
INSTALL = 'pip install -e ".[vllm]"'
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.33.0 config/lora.py MaxLoRARanks: the allowed max_lora_rank values
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class VLLMUnavailable(ConfigError):
    """engine.backend=vllm cannot run here (not installed, another version, no GPU, unsupported setup)."""


@dataclass(frozen=True)
class VLLMApi:
    """The three vLLM classes the engine uses; tests hand in stand-ins with the same signatures."""

    LLM: Any
    SamplingParams: Any
    LoRARequest: Any


def load_api() -> VLLMApi:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    return VLLMApi(LLM, SamplingParams, LoRARequest)


def installed_version() -> str | None:
    """The installed vllm's version, read from its package metadata (vllm itself is not imported)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_available(cfg: EngineConfig, lora_r: int = 0, devices: int = 1) -> None:
    """Stop at start, with one line, when engine.backend=vllm cannot run: vllm missing, another version
    (unless engine.allow_other_vllm), no CUDA GPU, or a setup this backend does not implement."""
    version = installed_version()
    if not version:
        raise VLLMUnavailable(f"engine.backend=vllm needs vLLM {VLLM_VERSION}, which is not installed; "
                              f"install it with: {INSTALL} (Linux, CUDA GPU)")
    if version != VLLM_VERSION:
        if not cfg.allow_other_vllm:
            raise VLLMUnavailable(f"engine.backend=vllm was written against vLLM {VLLM_VERSION}, but vLLM {version} "
                                  f"is installed; install {VLLM_VERSION} with {INSTALL}, or set "
                                  f"engine.allow_other_vllm=true to try {version}")
        log.warning("vLLM %s is installed; this backend was written against %s (engine.allow_other_vllm=true)",
                    version, VLLM_VERSION)
    if not torch.cuda.is_available():
        raise VLLMUnavailable(f"engine.backend=vllm needs a CUDA GPU and none is visible here; use engine.backend=hf, "
                              f"or run on a GPU machine with {INSTALL}")
    if cfg.tensor_parallel_size > 1 and devices > 1:
        raise VLLMUnavailable(f"bad config engine.tensor_parallel_size={cfg.tensor_parallel_size}: must be 1 with "
                              f"trainer.devices={devices} (every rank runs its own engine on its own GPU)")
    in_place = lora_r == 0 or cfg.lora_sync == "merged"
    if cfg.tensor_parallel_size > 1 and in_place:
        raise VLLMUnavailable(f"bad config engine.tensor_parallel_size={cfg.tensor_parallel_size}: loading the policy's "
                              f"weights in place into tensor-parallel workers is not implemented; use model.lora_r > 0 "
                              f"with engine.lora_sync=adapter, or tensor_parallel_size=1")
    if lora_r > LORA_RANKS[-1]:
        raise VLLMUnavailable(f"bad config model.lora_r={lora_r}: vLLM {VLLM_VERSION} serves LoRA ranks up to "
                              f"{LORA_RANKS[-1]}")


def lora_rank_bucket(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank r."""
    return next(b for b in LORA_RANKS if b >= r)


def sampling_kwargs(key: int, *, greedy: bool, temperature: float, top_p: float, max_tokens: int,
                    eos_id: int) -> dict[str, Any]:
    """SamplingParams fields of one request: seeded by the sample's key, eos as the stop token, the
    sampled token's log-prob (raw: see module doc), token ids only (no detokenizing)."""
    return {"n": 1, "seed": key, "temperature": 0.0 if greedy else temperature,
            "top_p": 1.0 if greedy else top_p, "top_k": 0, "max_tokens": max_tokens,
            "stop_token_ids": [eos_id], "logprobs": 0, "flat_logprobs": True, "detokenize": False}


def sampled_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from a CompletionOutput's `logprobs`: vLLM 0.33.0's
    `FlatLogprobs` (vllm/logprobs.py: flat `token_ids`/`logprobs` lists, position i spanning
    [start_indices[i], end_indices[i])) or a list of {token id: Logprob(logprob=...)} per position."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs (SamplingParams.logprobs must be 0)")
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-prob positions for {len(token_ids)} tokens")
    out = []
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: read the lists, no per-position dicts
        for i, tok in enumerate(token_ids):
            span = range(logprobs.start_indices[i], logprobs.end_indices[i])
            hit = next((k for k in span if logprobs.token_ids[k] == tok), None)
            if hit is None:
                raise RuntimeError(f"vLLM's log-probs at position {i} lack the sampled token {tok}")
            out.append(float(logprobs.logprobs[hit]))
        return out
    for i, (pos, tok) in enumerate(zip(logprobs, token_ids)):
        if tok not in pos:
            raise RuntimeError(f"vLLM's log-probs at position {i} lack the sampled token {tok}")
        out.append(float(pos[tok].logprob))
    return out


def to_generation(completion: Any) -> Generation:
    """A vLLM CompletionOutput (token_ids, logprobs, finish_reason) as a Generation: finished when it
    stopped on eos ("stop"), not when max_tokens or the model's length cut it off ("length")."""
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={reason!r} (expected stop or length)")
    ids = [int(t) for t in completion.token_ids]
    return Generation(ids=ids, finished=reason == "stop", logprobs=sampled_logprobs(ids, completion.logprobs))


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _rank_world()[1] > 1:
        dist.barrier()


@dataclass
class VLLMRolloutEngine:
    """Generation with vLLM on its own copy of the policy's weights, which `follow_policy` refreshes.

    The engine starts at the first `follow_policy` (or `generate`) from the policy's weights at that
    moment, written once to `work_dir/model` (removed again once vLLM has loaded it). LoRA policies
    (`lora_sync=adapter`) keep those base weights and get a new adapter directory and LoRARequest
    (a new id) at every sync; otherwise every sync loads the weights in place. `release` puts the
    engine to sleep while the policy trains (engine.sleep_mode)."""

    policy: nn.Module
    eos_id: int
    pad_id: int  # unused by vLLM (no padding); kept so both backends are built alike
    cfg: EngineConfig
    work_dir: Path
    default_max_new_tokens: int = 64
    seed: int = 0  # vLLM's engine seed; every request carries its own seed, so samples do not depend on it
    progress: bool = False
    stats: EngineStats = field(default_factory=EngineStats)
    api: VLLMApi | None = None  # None: the installed vllm
    _llm: Any = field(default=None, init=False, repr=False)
    _lora: Any = field(default=None, init=False, repr=False)
    _syncs: int = field(default=0, init=False)
    _round: int = field(default=0, init=False)
    _asleep: bool = field(default=False, init=False)

    @property
    def uses_adapter(self) -> bool:
        """LoRA served as a vLLM adapter (else the weights, merged for LoRA, are loaded in place)."""
        return is_lora(self.policy) and self.cfg.lora_sync == "adapter"

    def llm_kwargs(self, model_dir: Path) -> dict[str, Any]:
        """Arguments of `vllm.LLM(...)` (vLLM 0.33.0 entrypoints/llm.py `LLM.__init__` and EngineArgs)."""
        kw: dict[str, Any] = {
            "model": str(model_dir), "skip_tokenizer_init": True, "dtype": self.cfg.vllm_dtype, "seed": self.seed,
            "gpu_memory_utilization": self.cfg.gpu_memory_utilization,
            "tensor_parallel_size": self.cfg.tensor_parallel_size, "enable_prefix_caching": True,
            "enable_sleep_mode": self.cfg.sleep_mode, "logprobs_mode": "raw_logprobs",
            "enforce_eager": self.cfg.enforce_eager}
        if self.cfg.max_model_len is not None:
            kw["max_model_len"] = self.cfg.max_model_len
        if self.uses_adapter:
            ranks = [c.r for c in self.policy.peft_config.values()]
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_bucket(max(ranks)))
        if _rank_world()[1] > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        return kw

    # --- weights ------------------------------------------------------------------------------
    def follow_policy(self, policy: nn.Module, round_idx: int = 0) -> None:
        """Generate with `policy`'s current weights from now on: start the engine (first call), or wake
        it and load the weights (adapter: a new LoRARequest; else in place); then reset the prefix cache,
        whose blocks were computed with the old weights. Every rank calls it at the same point."""
        self.policy, self._round = policy, round_idx
        started = self._llm is None
        if started:
            self._start()
        elif self._asleep and not self.uses_adapter:
            self._llm.wake_up(tags=["weights"])  # level 2 dropped the weights: bring back the memory, then fill it
        elif self._asleep:
            self._llm.wake_up()
        if self.uses_adapter:
            self._new_adapter()
        elif not started:
            self._load_in_place()
        if self._asleep:
            if not self.uses_adapter:
                self._llm.wake_up(tags=["kv_cache"])  # the rest of the memory, once the weights are in
            self._asleep = False
        self._llm.reset_prefix_cache()

    def release(self) -> None:
        """The policy trains now: with engine.sleep_mode, free vLLM's GPU memory until the next sync
        (LoRA adapter: level 1, base weights parked in CPU memory; in place: level 2, weights dropped,
        as they are re-sent at the next sync anyway)."""
        if self.cfg.sleep_mode and self._llm is not None and not self._asleep:
            self._llm.sleep(level=1 if self.uses_adapter else 2)
            self._asleep = True

    def _start(self) -> None:
        api = self.api or load_api()
        rank, world = _rank_world()
        if world > 1:  # vLLM's external launcher reads these; Lightning put this rank's policy on current_device()
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
        elif self.cfg.tensor_parallel_size == 1:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: in-place syncs pass tensors by reference
        from gpo_exp.rollout.vllm_sync import save_model_dir

        model_dir = self.work_dir / "model"
        if rank == 0:
            save_model_dir(self.policy, model_dir, TORCH_DTYPES.get(self.cfg.vllm_dtype),
                           merge_lora=is_lora(self.policy) and not self.uses_adapter)
        _barrier()
        t0 = time.perf_counter()
        self._llm = api.LLM(**self.llm_kwargs(model_dir))
        log.info("vLLM engine started in %.0fs (%s)", time.perf_counter() - t0,
                 "LoRA adapters" if self.uses_adapter else "weights loaded in place each round")
        _barrier()
        if rank == 0:  # loaded into GPU memory; a sleeping engine keeps its copy in CPU memory or gets it re-sent
            import shutil

            shutil.rmtree(model_dir, ignore_errors=True)

    def _new_adapter(self) -> None:
        from gpo_exp.rollout.vllm_sync import save_adapter

        api = self.api or load_api()
        self._syncs += 1
        path = self.work_dir / "adapters" / f"{self._syncs:03d}_round{self._round:03d}"
        if _rank_world()[0] == 0:
            save_adapter(self.policy, path)
        _barrier()
        old, self._lora = self._lora, api.LoRARequest(lora_name=f"gpo-policy-{self._syncs}",
                                                      lora_int_id=self._syncs, lora_path=str(path))
        if old is not None:  # vLLM would evict it itself (LRU); dropping it now frees its slot at once
            self._llm.llm_engine.remove_lora(old.lora_int_id)

    def _load_in_place(self) -> None:
        from gpo_exp.rollout.vllm_sync import hf_weights

        dtype = TORCH_DTYPES.get(self.cfg.vllm_dtype)  # cast here: vLLM warns on every narrowing copy
        weights = ((n, t.to(dtype) if dtype is not None else t)
                   for n, t in hf_weights(self.policy, merge_lora=is_lora(self.policy)))
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    # --- generation -----------------------------------------------------------------------------
    def generate(self, prefixes: Sequence[Sequence[int]], sample_ids: Sequence[int], *, seed: int,
                 greedy: bool = False, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        t0 = time.perf_counter()
        temperature, limit, greedy, todo, slot = resolve_call(self.cfg, self.default_max_new_tokens, prefixes,
                                                              sample_ids, seed, greedy, max_new_tokens, temperature)
        if self._llm is None or self._asleep:
            self.follow_policy(self.policy, self._round)
        results: list[Generation] = []
        if todo:
            api = self.api or load_api()
            params = [api.SamplingParams(**sampling_kwargs(key, greedy=greedy, temperature=temperature,
                                                             top_p=self.cfg.top_p, max_tokens=limit, eos_id=self.eos_id))
                      for key, _ in todo]
            prompts = [{"prompt_token_ids": list(p)} for _, p in todo]  # vllm.inputs.TokensPrompt is this TypedDict
            outputs = self._llm.generate(prompts, params, use_tqdm=self.progress, lora_request=self._lora)
            if len(outputs) != len(todo):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(todo)} requests")
            results = [to_generation(o.outputs[0]) for o in outputs]
        out = [Generation(ids=list(results[s].ids), finished=results[s].finished, logprobs=list(results[s].logprobs))
               for s in slot]
        self.stats.requests += len(prefixes)
        self.stats.generated += len(todo)
        self.stats.generated_tokens += sum(len(g.ids) for g in results)
        self.stats.seconds += time.perf_counter() - t0
        return out
