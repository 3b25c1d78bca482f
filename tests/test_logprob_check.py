"""The start-up log-prob check (`batching.check_logprob_path`) in bf16: two correct matmul shapes round
logits differently, which must pass, while an architecture whose logits are not head(hidden) must not.

A GPU kernel may split the hidden dimension of one matmul shape (split-K) and not of another; the
stand-in model here computes its own logits that way (two bf16 partial products, each rounded, then
added), while `token_logps` runs the head as one matmul, as on a GPU with the two shapes.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from gpo_exp.registry import ConfigError
from gpo_exp.training.batching import check_logprob_path, logprob_tolerance


class SplitKLlama(LlamaForCausalLM):
    """Logits = the head applied in two halves of the hidden dimension, each partial sum rounded to the
    weights' dtype (split-K), instead of one matmul."""

    scale = 1.0  # != 1: an extra logit scale, which the decoder + head path would miss

    def forward(self, input_ids=None, attention_mask=None, **kw):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = self.lm_head.weight
        k = w.shape[1] // 2
        logits = (h[..., :k] @ w[:, :k].T + h[..., k:] @ w[:, k:].T) * self.scale
        return CausalLMOutputWithPast(logits=logits)


def split_k_llama(dtype: torch.dtype, scale: float = 1.0) -> SplitKLlama:
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = SplitKLlama(conf)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # logits of a trained model's size (|z| up to ~30), not random init's ~0.3
    model.scale = scale
    return model.to(dtype).eval()


def test_bf16_logits_from_two_matmul_shapes_pass_the_check():
    model = split_k_llama(torch.bfloat16)
    err = check_logprob_path(model)  # 1e-3 alone fails here: one bf16 rounding step of a logit near 16 is 0.06
    assert 1e-3 < err < 0.5


def test_fp32_keeps_the_tight_tolerance_and_a_logit_scale_still_fails_in_bf16():
    assert check_logprob_path(split_k_llama(torch.float32)) < 1e-3
    with pytest.raises(ConfigError, match="bfloat16 logits"):
        check_logprob_path(split_k_llama(torch.bfloat16, scale=0.8))
    with pytest.raises(ConfigError, match="float32 logits"):
        check_logprob_path(split_k_llama(torch.float32, scale=0.999))


def test_the_tolerance_follows_the_lowest_precision_and_the_logit_size():
    z = torch.tensor([[-20.0, 3.0, 16.0]])
    assert logprob_tolerance(z) == pytest.approx(1e-3 + 4 * torch.finfo(torch.float32).eps * 20)
    assert logprob_tolerance(z.bfloat16()) == pytest.approx(1e-3 + 4 * 2**-7 * 20)
    assert logprob_tolerance(z, torch.float16) == pytest.approx(1e-3 + 4 * 2**-10 * 20)
