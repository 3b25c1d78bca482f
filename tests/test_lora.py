"""LoRA: only adapters train, the adapters-off base is exactly the reference, runs save merged weights."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from omegaconf import OmegaConf

from gpo_exp.training.run_config import validate
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.lora import AdapterOffReference, apply_lora, is_lora
from gpo_exp.models.tiny import char_tokenizer, tiny_model
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.types import Continuation, Group
from gpo_exp.run import apply_fast_dev_run, train
from gpo_exp.training.batching import pad_sequences, sequence_logps
from gpo_exp.training.objectives import OPTIMIZERS
from gpo_exp.training.warmstart import WarmStartConfig, warm_start_key


@pytest.fixture
def tiny():
    tok = char_tokenizer(["Q: 1,+2\n1+2=3\nAnswer: 3", "0123456789+-*=:,QA nswer\n"])
    torch.manual_seed(0)
    return tiny_model(ModelConfig(n_layer=2, n_embd=32, n_head=2), tok), tok


def _batch(tok, texts):
    seqs = [tok(t, add_special_tokens=False).input_ids for t in texts]
    return pad_sequences(seqs, [3] * len(seqs), tok.pad_token_id)


def test_only_adapters_train_and_the_reference_is_the_untouched_base(tiny):
    model, tok = tiny
    base = copy.deepcopy(model)
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=None)
    ref = AdapterOffReference(policy)
    ref.requires_grad_(False).eval()  # what the training module does to any reference: must not freeze the policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert list(ref.parameters()) == []  # the policy is not registered twice

    batch = _batch(tok, ["Q: 1,+2\n1+2=3", "Q: 1,+2\n1+2=4"])
    with torch.no_grad():
        want, _ = sequence_logps(base, batch)
    obj = OPTIMIZERS.build({"name": "dpo", "lr": 1e-2})
    group = Group(prompt_ids=tok("Q: 1,+2\n", add_special_tokens=False).input_ids, prefix_ids=[],
                  continuations=[Continuation(tok("1+2=3\nAnswer: 3", add_special_tokens=False).input_ids, 1.0),
                                 Continuation(tok("1+2=4\nAnswer: 4", add_special_tokens=False).input_ids, 0.0)])
    examples = obj.make_examples([group], 1, random.Random(0))
    obj.precompute(examples, policy, ref, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        policy.train()
        loss, _ = obj.loss(policy, obj.collate(examples, tok.pad_token_id), ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
    got_ref, _ = sequence_logps(ref, batch)
    got_policy, _ = sequence_logps(policy.eval(), batch)
    assert torch.allclose(got_ref, want, atol=1e-6)  # the reference is still exactly the base
    assert not torch.allclose(got_policy, want, atol=1e-4)  # the adapters moved the policy
    for n, p in base.named_parameters():  # the base weights themselves never changed
        assert torch.equal(p, policy.get_base_model().get_parameter(n))


def test_adapter_off_reference_needs_a_lora_model(tiny):
    model, _ = tiny
    assert not is_lora(model)
    with pytest.raises(TypeError, match="peft LoRA model"):
        AdapterOffReference(model)


def test_lora_settings_do_not_change_the_warm_start_cache_key():
    # LoRA is applied after the warm start: the shipped / cached checkpoint must still be found
    from gpo_exp.benchmarks.arith import ArithConfig

    ws = WarmStartConfig()
    assert (warm_start_key(ModelConfig(), ArithConfig(), ws)
            == warm_start_key(ModelConfig(lora_r=8, lora_alpha=32), ArithConfig(), ws)
            == warm_start_key(ModelConfig(disable_dropout=False), ArithConfig(), ws))
    assert warm_start_key(ModelConfig(), ArithConfig(), ws) != warm_start_key(ModelConfig(n_layer=2), ArithConfig(), ws)


def test_negative_lora_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="model.lora_r"):
        ModelConfig(lora_r=-1)


@pytest.mark.parametrize("optimizer", ["dpo", "ipo", "kto", "simpo", "orpo", "ppo", "grpo"])
def test_lora_run_trains_adapters_and_saves_merged_weights(compose, tmp_path, optimizer):
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false",
                    f"optimizer={optimizer}", "model.lora_r=4", "optimizer.lr=1e-2"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    summary = train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    assert summary["warm_start/source"] in ("shipped", "cache") and summary["gpo/examples"] > 0
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.training.warmstart import warm_start

    before, _, _ = warm_start(cfg.model, BENCHMARKS.build(asdict(cfg.benchmark)), WarmStartConfig())
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")  # plain HF weights, no peft needed
    assert set(after.state_dict()) == set(before.state_dict())
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # merged LoRA deltas land in adapted weights
