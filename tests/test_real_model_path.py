"""The real-model path: memory-bounded log-probs, precision, gradient checkpointing, LoRA targets,
warm start only where it belongs, and the start-of-run checks (one line each)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gpo_exp.models.checks import check_loaded, enable_gradient_checkpointing
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.lora import AdapterOffReference, apply_lora
from gpo_exp.registry import ConfigError
from gpo_exp.training import batching
from gpo_exp.training.batching import check_logprob_path, token_logps
from gpo_exp.training.warmstart import PRETRAINED_LR, TINY_LR, WarmStartConfig


def qwen2(vocab: int = 1000, **kw) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    conf = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    return Qwen2ForCausalLM(conf)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(conf).eval()  # eval: no dropout, so two passes are comparable


def full_logps(model, ids, mask) -> torch.Tensor:
    """The old path: the full (B, T, V) logits, log_softmax, gather."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.pad(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))


def batch(vocab: int, lengths=(11, 7, 9)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    loss = torch.zeros(ids.shape)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        loss[i, 3:n] = 1.0  # a prompt of 3 tokens, then the completion
    return ids, mask, loss


@pytest.mark.parametrize("make", [qwen2, gpt2, lambda: qwen2(tie_word_embeddings=True)])
def test_chunked_selective_logps_equal_full_log_softmax(make, monkeypatch):
    monkeypatch.setattr(batching, "LOGPROB_CHUNK_BYTES", 16 * 4 * 1000)  # 16 rows at V=1000: several chunks
    model = make()
    vocab = model.config.vocab_size
    ids, mask, loss = batch(vocab)
    want = full_logps(model, ids, mask) * loss
    got, _ = token_logps(model, ids, mask, positions=loss)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert (got - want).abs().max().item() < 1e-5
    assert (got[loss == 0] == 0).all()
    # gradients through the checkpointed chunks equal the full path's
    params = [p for p in model.parameters()]
    g_full = torch.autograd.grad(want.sum(), params, allow_unused=True)
    g_new = torch.autograd.grad((token_logps(model, ids, mask, positions=loss)[0]).sum(), params, allow_unused=True)
    diffs = [(a - b).abs().max().item() for a, b in zip(g_full, g_new) if a is not None]
    assert max(diffs) < 1e-5 and len(diffs) == len(params)


def test_adapter_off_reference_logps_are_the_base_models():
    base = qwen2()
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, 4, 8.0, 0.0, "all-linear")
    for n, p in policy.named_parameters():  # move the adapters off zero so policy != reference
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    ids, mask, loss = batch(1000)
    ref = AdapterOffReference(policy)
    want = full_logps(frozen, ids, mask) * loss
    assert (token_logps(ref, ids, mask, positions=loss)[0] - want).abs().max().item() < 1e-5
    assert (token_logps(policy, ids, mask, positions=loss)[0] - want).abs().max().item() > 1e-3
    policy.train()
    token_logps(ref, ids, mask)
    assert policy.training  # the reference pass restores the policy's mode


def test_check_logprob_path_refuses_a_model_whose_logits_are_not_the_head():
    model = qwen2()
    assert check_logprob_path(model) < 1e-5

    class Scaled(Qwen2ForCausalLM):  # an extra logit scale the decoder+head path would miss
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 2.0
            return out

    scaled = Scaled(model.config)
    scaled.load_state_dict(model.state_dict())
    with pytest.raises(ConfigError, match="memory-bounded log-prob path"):
        check_logprob_path(scaled)


def test_gradient_checkpointing_is_on_and_gives_the_same_gradients():
    model = qwen2()
    ids, mask, loss = batch(1000)
    g_plain = torch.autograd.grad(token_logps(model.train(), ids, mask, positions=loss)[0].sum(),
                                  list(model.parameters()))
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    calls = []
    mlp = model.model.layers[0].mlp  # inside the checkpointed layer forward: runs again when recomputed
    forward = mlp.forward
    mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    g_ckpt = torch.autograd.grad(token_logps(model.train(), ids, mask, positions=loss)[0].sum(),
                                 list(model.parameters()))
    del mlp.forward
    assert len(calls) == 2  # the layer ran again in the backward pass: activations were recomputed
    assert max((a - b).abs().max().item() for a, b in zip(g_plain, g_ckpt)) < 1e-5


def test_lora_all_linear_and_a_target_that_matches_nothing():
    model = apply_lora(qwen2(), 4, 8.0, 0.0, "all-linear")
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    with pytest.raises(ConfigError) as e:
        apply_lora(qwen2(), 4, 8.0, 0.0, ["c_attn"])
    msg = str(e.value)
    assert "model.lora_target_modules=['c_attn']" in msg and "q_proj" in msg and "\n" not in msg
    assert ModelConfig(lora_target_modules="all-linear").lora_target_modules == "all-linear"
    with pytest.raises(ConfigError, match="lora_target_modules"):
        ModelConfig(lora_target_modules="attention")


def test_bf16_mixed_training_moves_fp32_master_weights_at_lr_1e5():
    """Lightning bf16-mixed: autocast forward, fp32 parameters and AdamW state, so a 1e-5 step lands.
    The same step applied to bf16 weights rounds away (the trade-off model.dtype=bfloat16 documents)."""
    import pytorch_lightning as pl

    from gpo_exp.training.module import PolicyModule
    from gpo_exp.training.objectives import OPTIMIZERS

    model = qwen2(vocab=1000)
    ref = copy.deepcopy(model)
    obj = OPTIMIZERS.build({"name": "dpo", "lr": 1e-5, "batch_size": 2})
    ids, _, _ = batch(1000, lengths=(10, 10, 10, 10))
    examples = [{"chosen": ids[0].tolist(), "rejected": ids[1].tolist(), "start": 3},
                {"chosen": ids[2].tolist(), "rejected": ids[3].tolist(), "start": 3}]
    module = PolicyModule(model, obj, ref=ref, gradient_clip_val=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = torch.utils.data.DataLoader([examples], batch_size=None, collate_fn=lambda ex: obj.collate_step(ex, 0))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    moved = [(n, (p.detach() - before[n]).abs().max().item()) for n, p in model.named_parameters()]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(d > 0 for _, d in moved) > 0.9 * len(moved)  # nearly every tensor moved
    w = before["model.layers.0.mlp.up_proj.weight"]
    step = model.model.layers[0].mlp.up_proj.weight.detach() - w
    assert 1e-6 < step.abs().max().item() < 2e-5  # an AdamW step of ~lr
    lost = ((w.bfloat16() + step.bfloat16()) == w.bfloat16()).float().mean().item()
    assert lost > 0.5  # in bf16 weights most of that update would be rounded away


def test_warm_start_auto_is_on_for_tiny_and_off_for_pretrained():
    auto = WarmStartConfig()
    assert auto.resolved(pretrained=False).enabled and auto.resolved(pretrained=False).lr == TINY_LR
    assert not auto.resolved(pretrained=True).enabled
    explicit = WarmStartConfig(enabled=True).resolved(pretrained=True)
    assert explicit.enabled and explicit.lr == PRETRAINED_LR
    assert WarmStartConfig(enabled="false", lr=1e-4).resolved(False).enabled is False
    with pytest.raises(ConfigError, match="warm_start.enabled"):
        WarmStartConfig(enabled="sometimes")


def test_start_checks_name_the_bad_value():
    from tests.test_models_hub import word_tokenizer

    model = qwen2()
    with pytest.raises(ConfigError, match=r"max_new_tokens=128: must be < the model's context of 128 tokens"):
        check_loaded(model, word_tokenizer(), ModelConfig(source="hub", path="x"), 128)
    check_loaded(model, word_tokenizer(), ModelConfig(source="hub", path="x"), 64)
    with pytest.raises(ConfigError, match="has no chat template"):
        check_loaded(model, word_tokenizer(chat_template=False),
                     ModelConfig(source="hub", path="x", require_chat_template=True), 64)


def test_a_model_that_needs_remote_code_stops_in_one_line(tmp_path: Path):
    from gpo_exp.models.hub import load_hub

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "architectures": ["MyLM"],
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"}}))
    with pytest.raises(ConfigError) as e:
        load_hub(ModelConfig(source="hub", path=str(tmp_path)))
    assert "trust_remote_code" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bias", [False, True])  # no bias: the fused backward; bias: the checkpointed fallback
def test_selective_logps_values_and_gradients_both_paths(bias):
    from gpo_exp.training.batching import selective_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    h = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    w = torch.randn(37)  # an upstream gradient that differs per row
    want = torch.log_softmax(head(h), -1).gather(-1, t[:, None]).squeeze(-1)
    got = selective_logps(head, h, t, chunk=8)
    assert (got - want).abs().max().item() < 1e-5
    g_want = torch.autograd.grad((want * w).sum(), [h, head.weight])
    g_got = torch.autograd.grad((selective_logps(head, h, t, chunk=8) * w).sum(), [h, head.weight])
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(g_want, g_got))
