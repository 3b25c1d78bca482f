"""The embedded `tiny` model: a small GPT-2 or Llama built from config, with a character tokenizer.

Both are real HF objects (`PreTrainedModel`, `PreTrainedTokenizerFast`), so training, rollout and
evaluation code is the same for `tiny` and for hub models.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast)

from gpo_exp.models.config import ModelConfig

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per character seen in `texts` (sorted, so the vocabulary is deterministic)."""
    chars = sorted({c for t in texts for c in t})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # [\s\S]: newlines are characters too
    tk.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A randomly initialised causal LM sized by `cfg`, with the tokenizer's special token ids."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.arch == "gpt2":
        conf = GPT2Config(n_positions=cfg.max_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(conf)
    conf = LlamaConfig(hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head, max_position_embeddings=cfg.max_len, **ids)
    return LlamaForCausalLM(conf)
