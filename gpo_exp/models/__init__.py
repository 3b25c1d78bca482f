"""Policy models: `build_base(cfg, texts)` gives an untrained tiny model or a loaded hub/GGUF model."""
from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.models.config import ModelConfig
from gpo_exp.models.hub import load_hub
from gpo_exp.models.tiny import char_tokenizer, tiny_model


def build_base(cfg: ModelConfig, texts: Sequence[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model before any warm start. `texts` (the task's prompts and solutions) define tiny's vocabulary."""
    if cfg.source == "tiny":
        tokenizer = char_tokenizer(texts)
        return tiny_model(cfg, tokenizer), tokenizer
    return load_hub(cfg)


__all__ = ["ModelConfig", "build_base", "load_hub"]
