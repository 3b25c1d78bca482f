"""Policy models: `build_base(cfg, texts)` gives an untrained tiny model or a loaded hub/GGUF model."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from gpo_exp.models.config import ModelConfig

if TYPE_CHECKING:  # config validation imports gpo_exp.models.config, hence this package, before torch/transformers
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def __getattr__(name: str) -> Any:
    if name == "load_hub":
        from gpo_exp.models.hub import load_hub

        return load_hub
    raise AttributeError(name)


def build_base(cfg: ModelConfig, texts: Sequence[str], device: torch.device | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model before any warm start. `texts` (the task's prompts and solutions) define tiny's vocabulary;
    hub models load onto `device` (tiny is built on the CPU, where its shipped warm start was trained)."""
    from gpo_exp.models.hub import load_hub
    from gpo_exp.models.tiny import char_tokenizer, tiny_model

    if cfg.source == "tiny":
        tokenizer = char_tokenizer(texts)
        return tiny_model(cfg, tokenizer), tokenizer
    if cfg.source == "random":
        from gpo_exp.models.random_init import random_model

        return random_model(cfg, device)
    return load_hub(cfg, device)


def disable_dropout(model: nn.Module) -> int:
    """Zero every dropout in `model`: dropout modules and attention-dropout rates kept as floats (Llama,
    Qwen). Returns how many were non-zero. The reference scores in eval mode; a policy scored with
    dropout would see its log-probs shifted against it, and preference losses read that as signal."""
    from torch import nn

    changed = 0
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)) and m.p > 0:
            m.p, changed = 0.0, changed + 1
        rate = getattr(m, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            m.attention_dropout, changed = 0.0, changed + 1
    return changed


__all__ = ["ModelConfig", "build_base", "disable_dropout", "load_hub"]
