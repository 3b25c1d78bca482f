"""The policy's weights in the form vLLM loads them: HF checkpoint names, a model directory, LoRA adapters.

vLLM keeps its own copy of the weights, so after every round the engine is told the new ones
(rollout/vllm_engine.py), in one of two ways:
  - LoRA (`lora_sync=adapter`): the adapter is saved with peft's `save_pretrained` under a new
    directory and handed to vLLM as a new `LoRARequest`; the base weights never change.
  - in place (full fine-tuning, or LoRA with `lora_sync=merged`): `hf_weights` yields every weight
    under its HF checkpoint name and vLLM's `load_weights` copies it in.

vLLM 0.33.0 loads Llama and Qwen2 from HF checkpoint names: `LlamaModel.hf_to_vllm_mapper`
(model_executor/models/llama.py, and `Qwen2Model.hf_to_vllm_mapper` in qwen2.py) stacks q/k/v into
`qkv_proj` and gate/up into `gate_up_proj` itself, and `AutoWeightsLoader` (models/utils.py) skips
a tied `lm_head.weight`. So the names handed over are exactly the ones `save_pretrained` writes,
with no vLLM-side renaming done here.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from gpo_exp.models.lora import is_lora

# Prefixes that wrappers put in front of the HF names: DDP / Lightning's forward wrapper, torch.compile,
# the training module's `policy` attribute, and peft's PeftModel -> LoraModel -> HF model chain.
WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.", "policy.", "base_model.model.")
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def hf_name(name: str) -> str:
    """A (possibly peft- or Lightning-wrapped) parameter name as the HF checkpoint spells it:
    `base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name.replace(".base_layer.", ".")


def is_adapter_param(name: str) -> bool:
    """A LoRA adapter's own parameter (lora_A/B, DoRA magnitude), which the base checkpoint does not hold."""
    return any(part in LORA_PARTS for part in name.split("."))


def hf_weights(policy: nn.Module, merge_lora: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, tensor) for every weight of the policy, as `save_pretrained` would name them.

    LoRA policies: the base weights with the adapters left out, or (merge_lora) with each adapter's
    delta W += B A * scale added, computed one layer at a time by peft's `get_delta_weight` (no second
    copy of the model). Tied weights come once, under their first name (the input embedding), as
    `named_parameters` gives them and the HF checkpoint stores them."""
    lora = is_lora(policy)
    owners: dict[str, nn.Module] = {}
    if lora and merge_lora:
        owners = {f"{n}.base_layer.weight": m for n, m in policy.named_modules()
                  if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    adapters = list(getattr(policy, "active_adapters", []) or []) if lora else []
    for name, param in policy.named_parameters():
        if lora and is_adapter_param(name):
            continue
        tensor = param.detach()
        if name in owners:
            module = owners[name]
            with torch.no_grad():
                for adapter in adapters:
                    if adapter in getattr(module, "r", {}):  # peft's per-adapter ranks: this layer has that adapter
                        tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
        yield hf_name(name), tensor


def base_model(policy: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (the policy itself when it has no adapters)."""
    return policy.get_base_model() if is_lora(policy) else policy


def save_model_dir(policy: nn.Module, out: Path, dtype: torch.dtype | None, merge_lora: bool = False,
                   eos_id: int | None = None) -> Path:
    """An HF model directory vLLM can start from: config.json and model.safetensors with the policy's
    weights now (LoRA: the base weights, or merged ones), in `dtype` (None: as they are). No tokenizer:
    the engine takes token ids and returns token ids.

    With `eos_id`, a generation_config.json whose only setting is that eos: vLLM adds the generation
    config's eos ids to every request's stop tokens (sampling_params.py `update_from_generation_config`)
    and, without the file, builds one from config.json (transformers_utils/config.py
    `try_get_generation_config`), whose eos_token_id can differ from the tokenizer's (the one the HF
    engine stops at) and whose sampling defaults would otherwise be read too."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = base_model(policy)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # a config built in code has none; vLLM picks its model class by it
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    if eos_id is not None:
        GenerationConfig(eos_token_id=int(eos_id)).save_pretrained(out)
    weights = {n: (t.to(dtype) if dtype is not None else t).cpu().contiguous()
               for n, t in hf_weights(policy, merge_lora)}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def save_adapter(policy: nn.Module, out: Path) -> Path:
    """The policy's LoRA adapter as peft saves it (adapter_config.json, adapter_model.safetensors),
    the format vLLM's `LoRARequest(lora_path=...)` loads."""
    if not is_lora(policy):
        raise TypeError(f"save_adapter needs a peft LoRA policy, got {type(policy).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(out))
    return out
