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
"""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class SamplingParams:
    def __init__(self, **kw: Any) -> None:
        unknown = set(kw) - SAMPLING_FIELDS
        assert not unknown, f"not SamplingParams fields in vLLM 0.33.0: {unknown}"
        self.__dict__.update(kw)


if HAVE_VLLM:  # the real classes where they can be imported
    from vllm import SamplingParams  # type: ignore[no-redef]  # noqa: F811
    from vllm.logprobs import FlatLogprobs, Logprob  # type: ignore[no-redef]  # noqa: F811
    from vllm.outputs import CompletionOutput  # type: ignore[no-redef]  # noqa: F811


def fake_tokens(seed: int, prompt: list[int], max_tokens: int, eos: int, vocab: int = 50) -> tuple[list[int], list[float]]:
    """A deterministic 'sample' of a seeded request: its tokens and log-probs depend on (seed, prompt) only."""
    rng = random.Random(hash((seed, tuple(prompt))))
    n = rng.randint(1, max_tokens + 2)
    toks = [rng.randrange(vocab) for _ in range(min(n, max_tokens))]
    toks = [t if t != eos else t + 1 for t in toks]
    if n <= max_tokens:
        toks[-1] = eos
    return toks, [-rng.random() * 3 for _ in toks]


class FakeEngineCore:
    def __init__(self) -> None:
        self.removed: list[int] = []

    def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


class FakeLLM:
    """Records what the backend asks of vLLM; 'generates' fake_tokens per request."""

    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - LLM_ARGS
        assert not unknown, f"not LLM/EngineArgs arguments in vLLM 0.33.0: {unknown}"
        self.kwargs = kwargs
        model = Path(kwargs["model"])
        self.model_files = sorted(p.name for p in model.iterdir())  # what vLLM would load at start
        self.eos = None
        self.calls: list[dict[str, Any]] = []
        self.events: list[tuple[Any, ...]] = []
        self.llm_engine = FakeEngineCore()
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[dict[str, Any]], sampling_params: list[Any], *, use_tqdm: bool = True,
                 lora_request: Any = None) -> list[RequestOutput]:
        self.calls.append({"prompts": prompts, "params": sampling_params, "lora": lora_request})
        self.events.append(("generate",))
        out = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            eos = sp.stop_token_ids[0]
            toks, lps = fake_tokens(sp.seed, p["prompt_token_ids"], sp.max_tokens, eos)
            flat = FlatLogprobs()
            for t, lp in zip(toks, lps):
                flat.append({t: Logprob(lp, rank=2), (t + 1) % 50: Logprob(lp - 1.0, rank=1)})
            reason = "stop" if toks[-1] == eos else "length"
            out.append(RequestOutput(str(i), None, p["prompt_token_ids"], None,
                                     [CompletionOutput(index=0, text="", token_ids=toks, cumulative_logprob=sum(lps),
                                                      logprobs=flat, finish_reason=reason)], True))
        return out

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
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
