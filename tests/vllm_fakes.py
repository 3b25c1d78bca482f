"""Stand-ins for the vLLM 0.33.0 objects the vLLM backend touches, for machines without vLLM (no GPU).

vLLM cannot be installed here (CUDA-only wheel, and its torch/transformers pins differ from the
project's), so these classes carry exactly the fields vLLM 0.33.0 documents, read from its wheel:
  vllm/logprobs.py       Logprob(logprob, rank, decoded_token); FlatLogprobs(start_indices, end_indices,
                         token_ids, logprobs, ranks, decoded_tokens), the sampled token first at each position
  vllm/outputs.py        CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
                         finish_reason, stop_reason, ...), RequestOutput(..., outputs, finished)
  vllm/lora/request.py   LoRARequest(lora_name, lora_int_id, lora_path)
  vllm/sampling_params.py SamplingParams fields (SAMPLING_FIELDS below)
  vllm/entrypoints/llm.py LLM.__init__ arguments and EngineArgs fields the backend passes (LLM_ARGS),
                         generate(prompts, sampling_params, *, use_tqdm, lora_request), collective_rpc,
                         reset_prefix_cache, sleep(level), wake_up(tags), llm_engine.remove_lora(id)
When vllm is importable the tests use its own Logprob / FlatLogprobs / CompletionOutput / SamplingParams.

The stand-ins also enforce the checks the real classes make, so a setting vLLM would refuse fails
here too. Each rule names the vLLM 0.33.0 file it mirrors:
  SamplingParams   value checks of sampling_params.py `_verify_args` (n, penalties, temperature in
                   [0, 2], top_p, top_k, min_p, max_tokens, min_tokens, logprobs, stop_token_ids),
                   `__post_init__` (seed -1 -> None, duplicate stop ids dropped, greedy forces top_p=1,
                   top_k=0 and n=1), and the seed's int64 slot (v1/worker/gpu/sample/states.py)
  FakeLLM()        dtype: "auto" takes config.json's dtype, float32 downcast to bfloat16 (config/model.py
                   `_resolve_auto_dtype`); LoRA needs a SupportsLoRA architecture
                   (v1/worker/lora_model_runner_mixin.py; the table in rollout/vllm_lora_archs.py) and a
                   float16/bfloat16 model, as `lora_dtype=auto` follows it (config/lora.py) and the LoRA
                   kernels assert it (lora/ops/triton_ops/lora_shrink_op.py); max_lora_rank one of
                   MaxLoRARanks (config/lora.py); max_model_len: null is the config's context, above it
                   is refused (config/model.py `_get_and_verify_max_len`); one max_model_len sequence of
                   KV cache must fit in gpu_memory_utilization x the card minus the weights
                   (v1/core/kv_cache_planning.py `_check_enough_kv_cache_memory`, 16-token blocks);
                   the worker sets torch's float32 matmul precision from VLLM_FLOAT32_MATMUL_PRECISION
                   (v1/worker/gpu_worker.py `Worker.__init__`)
  FakeLLM.generate the generation config's eos ids join every request's stop_token_ids
                   (sampling_params.py `update_from_generation_config`, called by
                   v1/engine/input_processor.py; generation_config.json, else one built from config.json:
                   transformers_utils/config.py `try_get_generation_config`); an empty prompt, or one of
                   max_model_len tokens or more, is refused (input_processor.py `_validate_prompt_len`);
                   a sample stops at a stop token ("stop") or at max_tokens / max_model_len ("length",
                   v1/core/sched/utils.py `check_stop`)
Each stand-in also records whether autocast was on when the backend called it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

# LLM.__init__ parameters, and EngineArgs fields reaching it through **kwargs (engine/arg_utils.py), that the backend uses
LLM_ARGS = {"model", "skip_tokenizer_init", "dtype", "seed", "gpu_memory_utilization", "tensor_parallel_size",
            "enforce_eager", "enable_prefix_caching", "enable_sleep_mode", "logprobs_mode", "max_model_len",
            "enable_lora", "max_loras", "max_lora_rank", "distributed_executor_backend"}
SAMPLING_FIELDS = {"n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
                   "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
                   "prompt_logprobs", "flat_logprobs", "detokenize", "skip_special_tokens"}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for tok, lp in (position or {}).items():
            self.token_ids.append(tok)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(lp.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


class VLLMValidationError(ValueError):
    """vllm/exceptions.py: what SamplingParams raises for a bad value."""


SAMPLING_DEFAULTS = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                     "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None,
                     "stop_token_ids": None, "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None,
                     "prompt_logprobs": None, "flat_logprobs": False, "detokenize": True, "skip_special_tokens": True}
SAMPLING_EPS = 1e-5  # sampling_params.py _SAMPLING_EPS: below it, greedy


class SamplingParams:
    """vllm/sampling_params.py SamplingParams: its fields (SAMPLING_FIELDS), __post_init__ and _verify_args."""

    def __init__(self, **kw: Any) -> None:
        unknown = set(kw) - SAMPLING_FIELDS
        assert not unknown, f"not SamplingParams fields in vLLM 0.33.0: {unknown}"
        self.__dict__.update({**SAMPLING_DEFAULTS, **kw})
        if self.seed == -1:
            self.seed = None
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self._verify_args()
        if self.temperature < SAMPLING_EPS:  # greedy
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:  # v1/worker/gpu/sample/states.py: an int64 slot
            raise OverflowError(f"seed {self.seed} does not fit vLLM's int64 seed slot")

    def _verify_args(self) -> None:
        def bad(cond: bool, msg: str) -> None:
            if cond:
                raise VLLMValidationError(msg)

        bad(not isinstance(self.n, int) or self.n < 1, f"n must be an int >= 1, got {self.n}.")
        bad(not -2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        bad(not -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        bad(not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0,
            f"repetition_penalty must be a finite number greater than zero, got {self.repetition_penalty}.")
        bad(not math.isfinite(self.temperature), f"temperature must be a finite number, got {self.temperature}.")
        bad(self.temperature < 0.0, f"temperature must be non-negative, got {self.temperature}.")
        bad(self.temperature > 2.0, f"temperature must be in [0, 2], got {self.temperature}.")
        bad(not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        bad(self.top_k < -1, f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        bad(not isinstance(self.top_k, int), f"top_k must be an integer, got {type(self.top_k).__name__}")
        bad(not 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.")
        bad(self.max_tokens is not None and self.max_tokens < 1, f"max_tokens must be at least 1, got {self.max_tokens}.")
        bad(self.min_tokens < 0, f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        bad(self.max_tokens is not None and self.min_tokens > self.max_tokens,
            f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        bad(self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0,
            f"logprobs must be non-negative or -1, got {self.logprobs}.")
        bad(self.prompt_logprobs is not None and self.prompt_logprobs != -1 and self.prompt_logprobs < 0,
            f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}.")
        bad(not all(isinstance(t, int) for t in self.stop_token_ids),
            f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        bad(any(not x for x in self.stop), "stop cannot contain an empty string.")
        bad(bool(self.stop) and not self.detokenize, "stop strings are only supported when detokenize is True.")

    def update_from_generation_config(self, generation_config: dict[str, Any], eos_token_id: int | None = None) -> None:
        """sampling_params.py: the generation config's eos ids join stop_token_ids (the tokenizer's eos,
        None without a tokenizer, is handled apart)."""
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        eos_ids.discard(eos_token_id)
        if eos_ids and not self.ignore_eos:
            self.stop_token_ids = list(eos_ids | set(self.stop_token_ids))


if HAVE_VLLM:  # the real classes where they can be imported
    from vllm import SamplingParams  # type: ignore[no-redef]  # noqa: F811
    from vllm.exceptions import VLLMValidationError  # type: ignore[no-redef]  # noqa: F811
    from vllm.logprobs import FlatLogprobs, Logprob  # type: ignore[no-redef]  # noqa: F811
    from vllm.outputs import CompletionOutput  # type: ignore[no-redef]  # noqa: F811


def fake_tokens(seed: int, prompt: list[int], max_tokens: int, stops: Any, vocab: int = 50) -> tuple[list[int], list[float]]:
    """A deterministic 'sample' of a seeded request: its tokens and log-probs depend on (seed, prompt) only.
    `stops`: a stop token id or ids; the sample ends at the first one it draws (or at max_tokens)."""
    stops = {stops} if isinstance(stops, int) else set(stops)
    first = min(stops) if stops else None
    rng = random.Random(hash((seed, tuple(prompt))))
    n = rng.randint(1, max_tokens + 2)
    toks = [rng.randrange(vocab) for _ in range(min(n, max_tokens))]
    if first is not None and n <= max_tokens:
        toks[-1] = first
    cut = next((i for i, t in enumerate(toks) if t in stops), None)
    toks = toks if cut is None else toks[: cut + 1]
    return toks, [-rng.random() * 3 for _ in toks]


class FakeEngineCore:
    def __init__(self) -> None:
        self.removed: list[int] = []

    def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # config/lora.py MaxLoRARanks
DTYPES = {"float32": (torch.float32, 4), "bfloat16": (torch.bfloat16, 2), "float16": (torch.float16, 2)}
BLOCK = 16  # KV-cache block size in tokens (config/cache.py default on CUDA)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


def autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


class FakeLLM:
    """Records what the backend asks of vLLM and checks it as vLLM 0.33.0 would (module docstring);
    'generates' fake_tokens per request. `gpu_bytes`: the simulated card."""

    instances: list["FakeLLM"] = []
    gpu_bytes: int = 80 * 2**30

    def __init__(self, **kwargs: Any) -> None:
        from gpo_exp.rollout.vllm_lora_archs import LORA_ARCHITECTURES

        unknown = set(kwargs) - LLM_ARGS
        assert not unknown, f"not LLM/EngineArgs arguments in vLLM 0.33.0: {unknown}"
        self.kwargs = kwargs
        self.autocast = [autocast_on()]  # at start, then at every generate / collective_rpc
        model = Path(kwargs["model"])
        self.model_files = sorted(p.name for p in model.iterdir())  # what vLLM would load at start
        config = json.loads((model / "config.json").read_text())
        self.architecture = (config.get("architectures") or ["?"])[0]
        # config/model.py _get_and_verify_dtype / _resolve_auto_dtype: auto is the config's dtype, fp32 downcast
        requested = kwargs.get("dtype", "auto")
        config_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        self.dtype = ("bfloat16" if config_dtype == "float32" else config_dtype) if requested == "auto" else requested
        if kwargs.get("enable_lora"):
            if self.architecture not in LORA_ARCHITECTURES:  # v1/worker/lora_model_runner_mixin.py
                raise ValueError(f"{self.architecture} does not support LoRA yet.")
            # config/lora.py: lora_dtype=auto is the model dtype; lora/ops/triton_ops/lora_shrink_op.py asserts it
            assert self.dtype in ("float16", "bfloat16"), f"LoRA kernels: inputs.dtype {self.dtype} not fp16/bf16"
            assert kwargs.get("max_lora_rank", 16) in LORA_RANKS, f"max_lora_rank {kwargs.get('max_lora_rank')}"
        # config/model.py _get_and_verify_max_len: null -> the config's context; above it -> refused
        context = min((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), default=None)
        self.max_model_len = kwargs.get("max_model_len") or context
        if context is not None and self.max_model_len > context:
            raise ValueError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                             f"max_model_len ({context})")
        # v1/core/kv_cache_planning.py _check_enough_kv_cache_memory: one max_model_len sequence must fit
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        available = int(self.gpu_bytes * kwargs.get("gpu_memory_utilization", 0.9)) - weights
        self.kv_bytes_per_token = self._kv_bytes_per_token(config)
        needed = math.ceil(self.max_model_len / BLOCK) * BLOCK * self.kv_bytes_per_token
        if available <= 0:
            raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`")
        if needed > available:
            raise ValueError(f"To serve at least one request with the model's max seq len ({self.max_model_len}), "
                             f"({needed / 2**30:.2f} GiB KV cache is needed, which is larger than the available KV "
                             f"cache memory ({available / 2**30:.2f} GiB).")
        # v1/worker/gpu_worker.py Worker.__init__: torch.set_float32_matmul_precision(VLLM_FLOAT32_MATMUL_PRECISION)
        torch.set_float32_matmul_precision(os.environ.get("VLLM_FLOAT32_MATMUL_PRECISION", "highest"))
        # transformers_utils/config.py try_get_generation_config: generation_config.json, else from config.json
        gen = model / "generation_config.json"
        self.generation_config = (json.loads(gen.read_text()) if gen.exists()
                                  else {"eos_token_id": config["eos_token_id"]} if config.get("eos_token_id") is not None
                                  else {})
        self.calls: list[dict[str, Any]] = []
        self.events: list[tuple[Any, ...]] = []
        self.llm_engine = FakeEngineCore()
        FakeLLM.instances.append(self)

    def _kv_bytes_per_token(self, config: dict[str, Any]) -> int:
        """K and V of every layer: 2 x layers x kv heads x head dim x dtype bytes."""
        layers = config.get("num_hidden_layers") or config.get("n_layer")
        heads = config.get("num_attention_heads") or config.get("n_head")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or (config.get("hidden_size") or config.get("n_embd")) // heads
        return 2 * layers * kv_heads * head_dim * DTYPES[self.dtype][1]

    def generate(self, prompts: list[dict[str, Any]], sampling_params: list[Any], *, use_tqdm: bool = True,
                 lora_request: Any = None) -> list[RequestOutput]:
        self.autocast.append(autocast_on())
        stops = []
        for p, sp in zip(prompts, sampling_params):
            n = len(p["prompt_token_ids"])  # v1/engine/input_processor.py _validate_prompt_len
            if n == 0:
                raise VLLMValidationError("The decoder prompt cannot be empty")
            if n >= self.max_model_len:
                raise VLLMValidationError(f"The decoder prompt (length {n}) plus the number of requested output "
                                          f"tokens (at least 1) is longer than the maximum model length of "
                                          f"{self.max_model_len}.")
            sp.update_from_generation_config(self.generation_config, None)  # no tokenizer: eos id None
            stops.append(list(sp.stop_token_ids))
        self.calls.append({"prompts": prompts, "params": sampling_params, "lora": lora_request, "stops": stops})
        self.events.append(("generate",))
        out = []
        for i, (p, sp, stop) in enumerate(zip(prompts, sampling_params, stops)):
            room = self.max_model_len - len(p["prompt_token_ids"])  # v1/core/sched/utils.py check_stop
            toks, lps = fake_tokens(sp.seed, p["prompt_token_ids"], min(sp.max_tokens, room), stop)
            flat = FlatLogprobs()
            for t, lp in zip(toks, lps):
                flat.append({t: Logprob(lp, rank=2), (t + 1) % 50: Logprob(lp - 1.0, rank=1)})
            reason = "stop" if toks and toks[-1] in stop else "length"
            out.append(RequestOutput(str(i), None, p["prompt_token_ids"], None,
                                     [CompletionOutput(index=0, text="", token_ids=toks, cumulative_logprob=sum(lps),
                                                      logprobs=flat, finish_reason=reason)], True))
        return out

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        self.autocast.append(autocast_on())
        kwargs = dict(kwargs or {})
        if "weights_iterator" in kwargs:  # consume it as the worker would, keeping copies to check
            kwargs["weights_iterator"] = [(n, t.detach().clone()) for n, t in kwargs["weights_iterator"]]
        self.events.append(("rpc", method, kwargs))
        return [None]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.events.append(("reset_prefix_cache",))
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.events.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.events.append(("wake_up", tags))
        return True


def fake_api() -> Any:
    from gpo_exp.rollout.vllm_engine import VLLMApi

    return VLLMApi(LLM=FakeLLM, SamplingParams=SamplingParams, LoRARequest=LoRARequest)
