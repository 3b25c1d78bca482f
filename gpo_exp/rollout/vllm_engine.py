"""engine.backend=vllm: the `RolloutEngine` protocol on vLLM's offline `LLM` API, written against vLLM 0.33.0.

vllm is imported only when the engine starts, so config validation and every other backend never
import it. What the contract needs, and where vLLM 0.33.0 provides it (paths inside its wheel):
  - Per-sample seeds. One request per distinct (prefix, sample index j), planned by the HF engine's
    `plan_requests`, with `SamplingParams(seed=key)`, key = `sample_keys(prefix, j, seed)`. vLLM 0.33.0
    decodes with Model Runner V2 by default (config/vllm.py `use_v2_model_runner`; none of its
    unsupported features is used here), which samples by Gumbel-max with noise hashed from (request
    seed, position, token) (v1/worker/gpu/sample/gumbel.py `gumbel_noised_argmax`), so a draw does not
    depend on the batch it lands in. The draws are vLLM's, not the HF engine's: the two backends sample
    different continuations. (`n=K` with one seed would tie the K samples of a prefix together, so j
    is one request each.)
  - Untempered log-probs. `logprobs=0` returns the sampled token's log-prob and
    `logprobs_mode="raw_logprobs"` computes it from the model's raw logits (config/model.py
    `ModelConfig.logprobs_mode`; v1/worker/gpu/sample/sampler.py `Sampler.__call__`: the log-probs are
    taken from `logits` unless the mode is one of PROCESSED_LOGPROBS_MODES, which use the logits after
    temperature, penalties and top-k/top-p). The default is already raw_logprobs; it is set
    explicitly so a changed default cannot change the estimators' prior.
  - Stop at eos, and only there (as the HF engine). The engine starts without a tokenizer (token ids
    in and out), so eos is given as `stop_token_ids`; vLLM also adds the eos ids of the model
    directory's generation config (sampling_params.py `update_from_generation_config`, called by
    v1/engine/input_processor.py; without a generation_config.json it is built from config.json's
    eos_token_id), so `save_model_dir` writes a generation_config.json whose eos is the engine's.
    The stop token stays in `token_ids` and `finish_reason` is "stop"; "length" means max_tokens or
    max_model_len (v1/core/sched/utils.py `check_stop`) cut the sample off.
  - `enable_prefix_caching=True`: GPO's continuations share their prefixes.
  - `max_model_len`: vLLM sizes its KV cache so that one sequence of max_model_len fits
    (v1/core/kv_cache_planning.py `_check_enough_kv_cache_memory`), and a null max_model_len means the
    model's whole context (131,072 tokens for Qwen2.5). The longest sequence a GPO round makes is a
    continuation of the longest prefix: longest prompt + (max_new_tokens - 1) completion tokens +
    max_new_tokens, so that (capped at the model's context) is the default.
  - No autocast: the trainer generates inside its precision context (bf16 autocast); vLLM's model
    runs in its own dtype, so every call into vLLM leaves autocast off (`no_autocast`).
  - float32 matmul precision: vLLM's worker sets `torch.set_float32_matmul_precision` from
    VLLM_FLOAT32_MATMUL_PRECISION (v1/worker/gpu_worker.py `Worker.__init__`, default "highest"); in
    one process that is the trainer's setting too, so the engine hands vLLM the trainer's value and
    restores it after start.

Refused at start, with one line (`check_config`; vLLM itself would stop inside `LLM()` or mid-round):
  - LoRA adapters with engine.vllm_dtype=float32: vLLM's LoRA kernels take fp16/bf16 only
    (lora/ops/triton_ops/lora_shrink_op.py asserts it), and `lora_dtype=auto` follows the model dtype
    (config/lora.py). (vllm_dtype=auto is fine: vLLM downcasts an fp32 checkpoint to bf16/fp16.)
  - LoRA adapters on an architecture vLLM 0.33.0 cannot serve with LoRA (rollout/vllm_lora_archs.py,
    e.g. GPT-2, the tiny model's default). lora_sync=merged serves such a model without LoRA kernels.
    Refusing rather than switching to merged weights by itself keeps the cost of a run what its
    config says (merged syncs send every weight each round) and the fix one override away.
  - engine.temperature above 2 (sampling_params.py `_verify_args`: temperature in [0, 2]).
  - engine.max_model_len below the longest sequence of a round (a continuation would be cut short,
    scored 0 and bias the value estimates) or above the model's context.

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

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from gpo_exp.models.lora import is_lora
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.engine import EngineConfig, EngineStats, Generation, resolve_call
from gpo_exp.rollout.vllm_lora_archs import LORA_ARCHITECTURES, supports_lora

log = logging.getLogger(__name__)

VLLM_VERSION = "0.33.0"  # the vLLM this backend was written against (pyproject's [vllm] extra takes 0.30-0.33)
# Resolves vllm 0.33.0 with torch 2.14.0 and transformers 5.20.2 from pyproject's ranges; without
# `-c constraints.txt`, whose exact torch/transformers are the CPU reference pair, not vLLM's.
INSTALL = 'pip install -e ".[vllm]"'
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.33.0 config/lora.py MaxLoRARanks: the allowed max_lora_rank values
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len")  # config keys vLLM reads a model's context from
MAX_TEMPERATURE = 2.0  # vLLM 0.33.0 sampling_params.py `_verify_args`: temperature must be in [0, 2]
LORA_EXAMPLES = "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM"
assert all(a in LORA_ARCHITECTURES for a in LORA_EXAMPLES.split(", "))


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


def check_config(cfg: EngineConfig, lora_r: int = 0, architecture: str | None = None,
                 temperatures: Sequence[float | None] = ()) -> None:
    """One-line VLLMUnavailable for a setting vLLM 0.33.0 cannot serve, whether or not vLLM is here:
    LoRA adapters in float32 or on an architecture without LoRA support, a temperature above 2.
    `architecture`: the policy's HF class name (None: not known yet; `check_policy` checks it later)."""
    adapter = lora_r > 0 and cfg.lora_sync == "adapter"
    if adapter and cfg.vllm_dtype == "float32":
        raise VLLMUnavailable(f"bad config engine.vllm_dtype=float32 with model.lora_r={lora_r}: vLLM's LoRA kernels "
                              f"take bfloat16 or float16 only; set engine.vllm_dtype=bfloat16 (or float16, auto), or "
                              f"engine.lora_sync=merged to serve merged weights without LoRA kernels")
    if adapter and architecture is not None and supports_lora(architecture) is False:
        raise VLLMUnavailable(f"bad config model.lora_r={lora_r} on {architecture}: vLLM {VLLM_VERSION} cannot serve "
                              f"{architecture} with LoRA adapters; set engine.lora_sync=merged (merged weights loaded "
                              f"each round), or use a model vLLM serves with LoRA ({LORA_EXAMPLES}, ...)")
    if adapter and architecture is not None and supports_lora(architecture) is None:
        log.warning("%s is not registered in vLLM %s: vLLM will try its Transformers backend, which serves LoRA "
                    "for most decoder models", architecture, VLLM_VERSION)
    for name, t in (("engine.temperature", cfg.temperature), *(("estimator.temperature", t) for t in temperatures)):
        if t is not None and t > MAX_TEMPERATURE:
            raise VLLMUnavailable(f"bad config {name}={t}: vLLM {VLLM_VERSION} samples at temperatures in "
                                  f"[0, {MAX_TEMPERATURE:g}]")


def check_available(cfg: EngineConfig, lora_r: int = 0, devices: int = 1, architecture: str | None = None,
                    temperatures: Sequence[float | None] = ()) -> None:
    """Stop at start, with one line, when engine.backend=vllm cannot run: a setting vLLM cannot serve
    (`check_config`, first: it needs fixing wherever the run goes), vllm missing, another version
    (unless engine.allow_other_vllm), no CUDA GPU, or a setup this backend does not implement."""
    check_config(cfg, lora_r, architecture, temperatures)
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
    version = installed_version()
    if not version:
        raise VLLMUnavailable(f"engine.backend=vllm needs vLLM {VLLM_VERSION}, which is not installed; "
                              f"install it with: {INSTALL} (Linux, CUDA GPU; without -c constraints.txt)")
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


def model_context(policy: nn.Module) -> int | None:
    """The policy's context length as vLLM derives its default max_model_len: the smallest of the
    config's length keys (transformers_utils/model_arch_config_convertor.py
    `derive_max_model_len_and_key`); None when the config names none."""
    config = getattr(_base(policy), "config", None)
    lengths = [n for key in CONTEXT_KEYS if isinstance(n := getattr(config, key, None), int) and n > 0]
    return min(lengths) if lengths else None


def needed_model_len(max_prompt_len: int, max_new_tokens: int) -> int:
    """The longest sequence of a GPO round: a continuation (max_new_tokens) of the longest prefix, which
    is the longest prompt plus (nearly) a whole max_new_tokens completion."""
    return max_prompt_len + 2 * max_new_tokens


def resolve_max_model_len(cfg: EngineConfig, max_prompt_len: int | None, max_new_tokens: int,
                          context: int | None) -> int | None:
    """engine.max_model_len, or (null) the longest sequence a round makes, capped at the model's
    context. One-line VLLMUnavailable when a set value is below that need or above the context.
    None: neither is known (vLLM then takes the model's context)."""
    need = needed_model_len(max_prompt_len, max_new_tokens) if max_prompt_len is not None else None
    if cfg.max_model_len is not None:
        if need is not None and cfg.max_model_len < need:
            raise VLLMUnavailable(f"bad config engine.max_model_len={cfg.max_model_len}: must be >= {need} (the longest "
                                  f"prompt, {max_prompt_len} tokens, + 2 x max_new_tokens={max_new_tokens}: a "
                                  f"continuation of the longest prefix), or null for exactly that")
        if context is not None and cfg.max_model_len > context:
            raise VLLMUnavailable(f"bad config engine.max_model_len={cfg.max_model_len}: must be <= the model's "
                                  f"context of {context} tokens (or null)")
        return cfg.max_model_len
    if need is None:
        return context
    if context is not None and need > context:
        log.warning("vLLM max_model_len: a round's longest sequence (%d tokens) exceeds the model's context (%d); "
                    "continuations past it stop with finish_reason=length", need, context)
        return context
    return need


def check_policy(cfg: EngineConfig, policy: nn.Module, max_prompt_len: int | None, max_new_tokens: int) -> int | None:
    """At engine build, the model loaded: its architecture against LoRA support (`check_config`) and the
    KV-cache length (`resolve_max_model_len`, returned)."""
    lora_r = max((c.r for c in policy.peft_config.values()), default=0) if is_lora(policy) else 0
    check_config(cfg, lora_r, type(_base(policy)).__name__)
    return resolve_max_model_len(cfg, max_prompt_len, max_new_tokens, model_context(policy))


def _base(policy: nn.Module) -> nn.Module:
    return policy.get_base_model() if is_lora(policy) else policy


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off for every device type where it is on: vLLM runs its model in its own dtype, and
    the trainer generates inside its precision context (bf16 autocast under bf16-mixed)."""
    with contextlib.ExitStack() as stack:
        for device in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


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
    max_prompt_len: int | None = None  # longest prompt of the run (tokens): sizes max_model_len when engine.max_model_len is null
    max_model_len: int | None = field(default=None, init=False)  # vLLM's, resolved at build (`check_policy`)
    _llm: Any = field(default=None, init=False, repr=False)
    _lora: Any = field(default=None, init=False, repr=False)
    _syncs: int = field(default=0, init=False)
    _round: int = field(default=0, init=False)
    _asleep: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        limit = self.cfg.max_new_tokens or self.default_max_new_tokens
        self.max_model_len = check_policy(self.cfg, self.policy, self.max_prompt_len, limit)

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
        if self.max_model_len is not None:
            kw["max_model_len"] = self.max_model_len
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
        with no_autocast():
            self._follow(policy, round_idx)

    def _follow(self, policy: nn.Module, round_idx: int) -> None:
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
            with no_autocast():
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
                           merge_lora=is_lora(self.policy) and not self.uses_adapter, eos_id=self.eos_id)
        _barrier()
        t0 = time.perf_counter()
        precision = torch.get_float32_matmul_precision()  # the worker sets VLLM_FLOAT32_MATMUL_PRECISION's
        os.environ["VLLM_FLOAT32_MATMUL_PRECISION"] = precision
        try:
            self._llm = api.LLM(**self.llm_kwargs(model_dir))
        finally:
            torch.set_float32_matmul_precision(precision)  # in one process the worker's setting is the trainer's
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
        with no_autocast():
            results = self._run(todo, greedy, temperature, limit)
        out = [Generation(ids=list(results[s].ids), finished=results[s].finished, logprobs=list(results[s].logprobs))
               for s in slot]
        self.stats.requests += len(prefixes)
        self.stats.generated += len(todo)
        self.stats.generated_tokens += sum(len(g.ids) for g in results)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _run(self, todo: list[tuple[int, tuple[int, ...]]], greedy: bool, temperature: float,
             limit: int) -> list[Generation]:
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
        return results
