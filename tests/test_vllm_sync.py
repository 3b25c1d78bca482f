"""The policy's weights in the form vLLM 0.33.0 loads them, on random-init Llama and Qwen2 models built from config.

Two checks per model, plain, LoRA-wrapped (peft) and Lightning-wrapped (`module.policy`):
  1. the names and shapes handed to vLLM are exactly the HF checkpoint's (what `save_pretrained` writes);
  2. those names land on vLLM's own layout. VLLM_STACKED is vLLM 0.33.0's `LlamaModel.hf_to_vllm_mapper`
     (model_executor/models/llama.py, `orig_to_new_stacked`; qwen2.py's `Qwen2Model.hf_to_vllm_mapper` is the
     same), and `vllm_layout` transcribes the parameters of `LlamaForCausalLM` / `Qwen2ForCausalLM` there
     (qkv_proj = QKVParallelLinear with bias for Qwen2, gate_up_proj = MergedColumnParallelLinear,
     RMSNorm weights, VocabParallelEmbedding, ParallelLMHead tied to the embedding when
     tie_word_embeddings, which `AutoWeightsLoader` then skips). Every vLLM parameter must receive all its
     shards, each with the shard's shape, and no name may fall outside the layout (vLLM raises on those).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

from gpo_exp.models.config import ModelConfig
from gpo_exp.models.random_init import SHAPES, small_config
from gpo_exp.rollout.vllm_sync import hf_name, hf_weights, save_adapter, save_model_dir

VLLM_STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
                ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=80, max_position_embeddings=64,
                                        tie_word_embeddings=tied)).eval()


def qwen2(hub_id: str) -> Qwen2ForCausalLM:
    """A random-init twin of a Qwen2 preset (gpo_exp.models.random_init): its GQA ratio, MLP ratio and tying."""
    torch.manual_seed(0)
    conf = small_config(SHAPES[hub_id], ModelConfig(source="random", path=hub_id, n_embd=64, n_head=4, n_layer=2),
                        vocab_size=80, special=dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return Qwen2ForCausalLM(conf).eval()


MODELS = {"llama": lambda: llama(False), "llama-tied": lambda: llama(True),
          "qwen2-r1-1.5b": lambda: qwen2("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
          "qwen2.5-0.5b-tied": lambda: qwen2("Qwen/Qwen2.5-0.5B-Instruct")}


def with_lora(model: nn.Module, targets: str | list[str] = "all-linear") -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=targets))


def checkpoint(model: nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(tmp_path / "hf")
    return load_file(str(tmp_path / "hf" / "model.safetensors"))


def vllm_layout(conf) -> dict[str, dict[object, tuple[int, ...]]]:
    """vLLM parameter name -> {shard id: shape} (shard None: loaded whole), at tensor_parallel_size=1."""
    h, hd = conf.hidden_size, getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    q, kv, inter = conf.num_attention_heads * hd, conf.num_key_value_heads * hd, conf.intermediate_size
    qkv_bias = conf.model_type == "qwen2" or getattr(conf, "attention_bias", False)
    out: dict[str, dict[object, tuple[int, ...]]] = {"model.embed_tokens.weight": {None: (conf.vocab_size, h)},
                                                     "model.norm.weight": {None: (h,)}}
    for i in range(conf.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = {"q": (q, h), "k": (kv, h), "v": (kv, h)}
        if qkv_bias:
            out[p + "self_attn.qkv_proj.bias"] = {"q": (q,), "k": (kv,), "v": (kv,)}
        out[p + "self_attn.o_proj.weight"] = {None: (h, q)}
        out[p + "mlp.gate_up_proj.weight"] = {0: (inter, h), 1: (inter, h)}
        out[p + "mlp.down_proj.weight"] = {None: (h, inter)}
        out[p + "input_layernorm.weight"] = {None: (h,)}
        out[p + "post_attention_layernorm.weight"] = {None: (h,)}
    if not conf.tie_word_embeddings:
        out["lm_head.weight"] = {None: (conf.vocab_size, h)}
    return out


def to_vllm(name: str) -> tuple[str, object]:
    """vLLM's WeightsMapper._map_name_with_shard for the stacked entries (substring, first occurrence)."""
    shard = None
    for sub, (new, sid) in VLLM_STACKED.items():
        if sub in name:
            name, shard = name.replace(sub, new, 1), sid
    return name, shard


@pytest.mark.parametrize("kind", list(MODELS))
def test_names_and_shapes_are_the_hf_checkpoints(kind, tmp_path):
    model = MODELS[kind]()
    ckpt = checkpoint(model, tmp_path)
    plain = {n: t.shape for n, t in hf_weights(model)}
    assert plain == {n: t.shape for n, t in ckpt.items()}
    lora = with_lora(copy.deepcopy(model))
    wrapped = {n: t for n, t in hf_weights(lora)}
    assert {n: t.shape for n, t in wrapped.items()} == plain  # adapters dropped, base_layer unwrapped
    assert all(torch.equal(wrapped[n], ckpt[n]) for n in ckpt)  # ... and the base weights themselves
    holder = nn.Module()
    holder.policy = lora  # the training module's attribute, as in its state_dict keys
    lightning = {hf_name(n) for n, _ in holder.named_parameters() if "lora_" not in n}
    assert lightning == set(plain)


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_name_lands_on_vllms_layout_with_every_shard(kind):
    model = MODELS[kind]()
    layout = vllm_layout(model.config)
    got: dict[str, dict[object, tuple[int, ...]]] = {}
    for name, tensor in hf_weights(with_lora(model)):
        target, shard = to_vllm(name)
        assert target in layout, f"{name} -> {target}: no such vLLM parameter"
        assert shard not in got.setdefault(target, {}), f"{name}: shard {shard} of {target} twice"
        got[target][shard] = tuple(tensor.shape)
    assert got == layout


def test_the_tied_head_is_not_sent_separately():
    names = {n for n, _ in hf_weights(MODELS["qwen2.5-0.5b-tied"]())}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize("kind", ["llama", "qwen2-r1-1.5b"])
def test_merged_lora_weights_equal_peft_merge_and_unload(kind):
    lora = with_lora(MODELS[kind]())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    merged = dict(hf_weights(lora, merge_lora=True))
    reference = dict(copy.deepcopy(lora).merge_and_unload().named_parameters())
    assert set(merged) == set(reference)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], dict(hf_weights(lora))[q])  # the delta is in
    assert all(torch.allclose(merged[n], reference[n], atol=1e-6) for n in reference)


def test_model_dir_is_an_hf_checkpoint_of_the_policy_now(tmp_path):
    model = MODELS["qwen2-r1-1.5b"]()
    lora = with_lora(model)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    out = save_model_dir(lora, tmp_path / "base", dtype=None)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.architectures == ["Qwen2ForCausalLM"]
    with torch.no_grad(), lora.disable_adapter():
        base_logits = lora(input_ids=ids).logits
    assert torch.allclose(reloaded(input_ids=ids).logits, base_logits, atol=1e-5)  # the base, adapters off
    merged_dir = save_model_dir(lora, tmp_path / "merged", dtype=torch.bfloat16, merge_lora=True)
    assert {t.dtype for t in load_file(str(merged_dir / "model.safetensors")).values()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, lora(input_ids=ids).logits, atol=0.1)


def test_saved_adapter_reloads_to_the_same_policy(tmp_path):
    import peft

    lora = with_lora(MODELS["llama"](), ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    path = save_adapter(lora, tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(MODELS["llama"](), str(path)).eval()
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(TypeError, match="LoRA"):
        save_adapter(MODELS["llama"](), tmp_path / "x")
