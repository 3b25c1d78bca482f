"""Model config: which policy to load and how (tiny built in code, a hub/local HF model, or GGUF)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpo_exp.registry import check

SOURCES = ("tiny", "hub", "gguf", "random")  # random: a preset's architecture, shrunk, random weights (models/random_init.py)
# Fields that change a model's initial weights: only these enter the warm-start cache key, so adding
# a runtime field (checkpointing, LoRA, templates) never orphans a cached or shipped warm start.
WEIGHT_FIELDS = ("name", "source", "path", "gguf_file", "package", "dtype", "chat_template", "arch", "n_layer",
                 "n_embd", "n_head", "max_len")


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, used in run directory names
    source: str = "tiny"  # tiny: built from this config in code | hub: HF hub id or local dir | gguf: a GGUF file | random: a random-init twin of hub model `path` (n_layer/n_embd/n_head; SmolLM2 tokenizer)
    path: str | None = None  # hub id or local HF directory (hub); directory holding gguf_file (gguf)
    gguf_file: str | None = None  # GGUF file name inside `path` (gguf)
    package: str | None = None  # python package that ships the weights; `path` is resolved inside it (gguf)
    dtype: str = "float32"  # weights: float32 (fp32 masters under trainer.precision=bf16-mixed) | bfloat16 | float16 (half the memory; fine for a frozen LoRA base, but full fine-tuning rounds away updates below ~1/256 of a weight)
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template when it has one
    arch: str = "gpt2"  # tiny only: gpt2 | llama
    n_layer: int = 4  # tiny only: transformer blocks
    n_embd: int = 128  # tiny only: hidden size
    n_head: int = 4  # tiny only: attention heads
    max_len: int = 160  # tiny only: context length in tokens
    lora_r: int = 0  # LoRA rank (peft); 0 = full fine-tuning. With LoRA the reference is the base with adapters off
    lora_alpha: float = 16.0  # LoRA scaling numerator (update scale alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    lora_target_modules: Any = None  # modules to adapt: a list of names, "all-linear" (every linear layer but the output head), or null (peft's default for the architecture)
    disable_dropout: bool = True  # zero the policy's dropout before training (as TRL does): its log-probs would be noisy against the dropout-free reference
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: memory for compute (hub models)
    require_chat_template: bool = False  # stop at start when the tokenizer has no chat template (instruct presets)

    def __post_init__(self) -> None:
        check(self.source in SOURCES, "model.source", self.source, f"one of {', '.join(SOURCES)}")
        check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype, "float32, bfloat16 or float16")
        check(self.arch in ("gpt2", "llama"), "model.arch", self.arch, "gpt2 or llama")
        check(self.n_layer >= 1 and self.n_embd >= 8 and self.n_head >= 1, "model.n_layer/n_embd/n_head",
              (self.n_layer, self.n_embd, self.n_head), "positive sizes")
        check(self.lora_r >= 0, "model.lora_r", self.lora_r, ">= 0 (0 = full fine-tuning)")
        check(0 <= self.lora_dropout < 1, "model.lora_dropout", self.lora_dropout, "in [0, 1)")
        t = self.lora_target_modules
        check(t is None or t == "all-linear" or (isinstance(t, (list, tuple)) and len(t) > 0
                                                 and all(isinstance(x, str) and x for x in t)),
              "model.lora_target_modules", t, 'a non-empty list of module names, "all-linear", or null')
        if isinstance(t, tuple):
            self.lora_target_modules = list(t)
        if self.source in ("hub", "gguf"):
            check(bool(self.path) or bool(self.package), "model.path", self.path, "set for source=hub/gguf")
        if self.source == "gguf":
            check(bool(self.gguf_file), "model.gguf_file", self.gguf_file, "set for source=gguf")
