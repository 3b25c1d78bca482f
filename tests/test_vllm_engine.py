"""engine.backend=vllm without vLLM: config, the one-line refusals, requests, seeds, SamplingParams,
output conversion, and the engine's weight syncs against a recording stand-in for `vllm.LLM`.

vLLM is not installed here, so tests/vllm_fakes.py stands in for its objects with exactly the fields
vLLM 0.33.0 documents (its docstring names the files read); with vllm installed, the output-conversion
tests use vLLM's own Logprob / FlatLogprobs / CompletionOutput / SamplingParams instead.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import vllm_fakes as vf
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.engine import EngineConfig, sample_keys
from gpo_exp.rollout import vllm_engine as ve
from gpo_exp.rollout.vllm_engine import (VLLMRolloutEngine, VLLMUnavailable, check_available, lora_rank_bucket,
                                         sampled_logprobs, sampling_kwargs, to_generation)

EOS = 2
ROOT = Path(__file__).resolve().parent.parent


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    conf = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(conf).eval()


def lora_llama(r: int = 4):
    import peft

    return peft.get_peft_model(small_llama(), peft.LoraConfig(r=r, lora_alpha=8, task_type="CAUSAL_LM",
                                                              target_modules=["q_proj", "v_proj"]))


def engine(tmp_path: Path, policy=None, **cfg) -> VLLMRolloutEngine:
    vf.FakeLLM.instances.clear()
    return VLLMRolloutEngine(policy if policy is not None else small_llama(), eos_id=EOS, pad_id=0,
                             cfg=EngineConfig(backend="vllm", **cfg), work_dir=tmp_path / "vllm",
                             default_max_new_tokens=6, api=vf.fake_api())


# --- config and the one-line refusals -----------------------------------------------------------------
def test_engine_vllm_composes_and_validates(compose):
    from gpo_exp.training.run_config import validate

    cfg = validate(compose(["engine=vllm", "engine.gpu_memory_utilization=0.5", "engine.sleep_mode=true"]))
    assert cfg.engine.backend == "vllm" and cfg.engine.gpu_memory_utilization == 0.5 and cfg.engine.sleep_mode
    assert cfg.engine.lora_sync == "adapter" and cfg.engine.tensor_parallel_size == 1


def test_config_validation_imports_neither_vllm_nor_the_backend():
    code = ("import sys; from gpo_exp.config import register_configs; from gpo_exp.training.run_config import validate; from omegaconf import OmegaConf; "
            "from gpo_exp.registry import to_dataclass; from gpo_exp.rollout.engine import EngineConfig; "
            "assert to_dataclass(EngineConfig, {'backend': 'vllm'}, 'engine').backend == 'vllm'; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'gpo_exp.rollout.vllm'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("field,value,allowed", [("backend", "sglang", "hf or vllm"),
                                                  ("gpu_memory_utilization", 1.5, "in (0, 1]"),
                                                  ("tensor_parallel_size", 0, ">= 1"),
                                                  ("vllm_dtype", "fp8", "one of bfloat16"),
                                                  ("lora_sync", "copy", "adapter or merged")])
def test_bad_engine_values_are_one_line_config_errors(field, value, allowed):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**{field: value})
    assert f"engine.{field}" in str(e.value) and allowed in str(e.value) and "\n" not in str(e.value)


def test_without_vllm_the_backend_stops_with_the_install_line(monkeypatch):
    monkeypatch.setattr(ve, "installed_version", lambda: None)
    with pytest.raises(VLLMUnavailable) as e:
        check_available(EngineConfig(backend="vllm"))
    msg = str(e.value)
    assert 'pip install -e ".[vllm]"' in msg and "0.33.0" in msg and "\n" not in msg


def test_without_a_gpu_the_backend_stops_with_the_install_line(monkeypatch):
    monkeypatch.setattr(ve, "installed_version", lambda: "0.33.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VLLMUnavailable) as e:
        check_available(EngineConfig(backend="vllm"))
    assert "CUDA GPU" in str(e.value) and 'pip install -e ".[vllm]"' in str(e.value) and "\n" not in str(e.value)


def test_another_vllm_version_names_both_and_stops_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(ve, "installed_version", lambda: "0.34.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(VLLMUnavailable) as e:
        check_available(EngineConfig(backend="vllm"))
    assert "0.33.0" in str(e.value) and "0.34.1" in str(e.value) and "engine.allow_other_vllm=true" in str(e.value)
    with caplog.at_level("WARNING"):
        check_available(EngineConfig(backend="vllm", allow_other_vllm=True))
    assert any("0.34.1" in r.getMessage() and "0.33.0" in r.getMessage() for r in caplog.records)


def test_unsupported_parallel_setups_are_refused(monkeypatch):
    monkeypatch.setattr(ve, "installed_version", lambda: "0.33.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tp2 = EngineConfig(backend="vllm", tensor_parallel_size=2)
    with pytest.raises(VLLMUnavailable, match="trainer.devices=2"):
        check_available(tp2, lora_r=8, devices=2)
    with pytest.raises(VLLMUnavailable, match="in place into tensor-parallel"):
        check_available(tp2, lora_r=0)
    check_available(tp2, lora_r=8)  # LoRA adapters reach TP workers as files: allowed
    with pytest.raises(VLLMUnavailable, match="lora_r=1024"):
        check_available(EngineConfig(backend="vllm"), lora_r=1024)


def test_gpo_run_with_engine_vllm_and_no_vllm_stops_at_start_with_one_line(tmp_path):
    if vf.HAVE_VLLM and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are here: the backend would start")
    proc = subprocess.run([sys.executable, "-m", "gpo_exp.run", "engine=vllm", "logger.wandb=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and 'pip install -e ".[vllm]"' in errors[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


# --- requests, seeds, SamplingParams -------------------------------------------------------------------
def test_one_request_per_distinct_prefix_and_sample_index(tmp_path):
    eng = engine(tmp_path)
    prefixes = [[1, 5, 6], [1, 5, 6], [1, 5, 6], [1, 7]]
    gens = eng.generate(prefixes, [0, 1, 0, 0], seed=3)
    llm = vf.FakeLLM.instances[0]
    sent = [(tuple(p["prompt_token_ids"]), sp.seed) for p, sp in zip(llm.calls[0]["prompts"], llm.calls[0]["params"])]
    keys = sample_keys(prefixes, [0, 1, 0, 0], 3)
    assert sent == [((1, 5, 6), keys[0]), ((1, 5, 6), keys[1]), ((1, 7), keys[3])]  # the duplicate is generated once
    assert len(gens) == 4 and gens[2].ids == gens[0].ids and gens[2] is not gens[0]  # ...and copied to its row
    assert eng.stats.requests == 4 and eng.stats.generated == 3
    assert eng.stats.generated_tokens == sum(len(g.ids) for g in (gens[0], gens[1], gens[3]))


def test_dedup_off_sends_every_request(tmp_path):
    eng = engine(tmp_path, dedup=False)
    eng.generate([[1, 5], [1, 5]], [0, 0], seed=0)
    assert len(vf.FakeLLM.instances[0].calls[0]["prompts"]) == 2 and eng.stats.generated == 2


def test_a_sample_is_the_same_draw_in_any_batch_and_distinct_across_j(tmp_path):
    eng = engine(tmp_path)
    alone = eng.generate([[1, 9]], [2], seed=7)[0]
    mixed = eng.generate([[1, 4, 4], [1, 9], [1, 9], [3]], [0, 0, 2, 5], seed=7)
    llm = vf.FakeLLM.instances[0]
    seeds_alone = [sp.seed for sp in llm.calls[0]["params"]]
    seeds_mixed = [sp.seed for sp in llm.calls[1]["params"]]
    assert seeds_mixed[2] == seeds_alone[0]  # (prefix [1, 9], j=2) carries the same seed in both batches
    assert mixed[2].ids == alone.ids and mixed[2].logprobs == alone.logprobs
    k = 16
    seeds = {s for s in sample_keys([[1, 9]] * k, list(range(k)), 7)}
    assert len(seeds) == k  # the K continuations of one prefix are K different draws
    assert sample_keys([[1, 9]], [2], 8) != sample_keys([[1, 9]], [2], 7)  # a new round seed: new draws


def test_greedy_requests_of_a_prefix_are_one_temperature_zero_request(tmp_path):
    eng = engine(tmp_path, temperature=0.7, top_p=0.9)
    gens = eng.generate([[1, 3]] * 4, [0, 1, 2, 3], seed=1, greedy=True)
    params = vf.FakeLLM.instances[0].calls[0]["params"]
    assert len(params) == 1 and params[0].temperature == 0.0 and params[0].top_p == 1.0
    assert all(g.ids == gens[0].ids for g in gens)


def test_sampling_params_fields_come_from_the_engine_config(tmp_path):
    eng = engine(tmp_path, temperature=0.7, top_p=0.9, max_new_tokens=5)
    eng.generate([[1, 3]], [4], seed=2)
    eng.generate([[1, 3]], [4], seed=2, max_new_tokens=3, temperature=1.3)
    first, second = (c["params"][0] for c in vf.FakeLLM.instances[0].calls)
    assert (first.n, first.seed, first.temperature, first.top_p, first.top_k, first.max_tokens) == \
           (1, sample_keys([[1, 3]], [4], 2)[0], 0.7, 0.9, 0, 5)
    assert first.stop_token_ids == [EOS] and first.logprobs == 0 and first.detokenize is False
    assert first.flat_logprobs is True
    assert (second.temperature, second.max_tokens) == (1.3, 3)  # per-call overrides, as in the HF engine
    engine(tmp_path).generate([[1, 3]], [0], seed=0)
    assert vf.FakeLLM.instances[0].calls[0]["params"][0].max_tokens == 6  # neither given: the benchmark's default


def test_sampling_kwargs_build_a_real_sampling_params_when_vllm_is_here():
    kw = sampling_kwargs(123, greedy=False, temperature=0.8, top_p=0.95, max_tokens=17, eos_id=EOS)
    sp = vf.SamplingParams(**kw)  # vLLM's own class when importable, else one that rejects unknown fields
    assert (sp.seed, sp.temperature, sp.top_p, sp.max_tokens, sp.logprobs) == (123, 0.8, 0.95, 17, 0)
    assert list(sp.stop_token_ids) == [EOS] and sp.detokenize is False


def test_empty_prefix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one token"):
        engine(tmp_path).generate([[]], [0], seed=0)


# --- vLLM outputs -> Generation -----------------------------------------------------------------------
def _flat(positions):
    flat = vf.FlatLogprobs()
    for pos in positions:
        flat.append({t: vf.Logprob(lp, rank=r) for t, (lp, r) in pos.items()})
    return flat


def test_finished_comes_from_finish_reason_and_eos_stays_in_the_ids():
    lps = _flat([{7: (-0.5, 1)}, {EOS: (-0.1, 1)}])
    g = to_generation(vf.CompletionOutput(index=0, text="", token_ids=[7, EOS], cumulative_logprob=-0.6,
                                          logprobs=lps, finish_reason="stop"))
    assert g.ids == [7, EOS] and g.finished and g.logprobs == pytest.approx([-0.5, -0.1])
    g = to_generation(vf.CompletionOutput(index=0, text="", token_ids=[7, 8], cumulative_logprob=-1.0,
                                          logprobs=_flat([{7: (-0.5, 1)}, {8: (-0.5, 1)}]), finish_reason="length"))
    assert not g.finished
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        to_generation(vf.CompletionOutput(index=0, text="", token_ids=[7], cumulative_logprob=None,
                                          logprobs=_flat([{7: (-0.5, 1)}]), finish_reason="abort"))


def test_the_sampled_tokens_log_prob_is_read_from_flat_logprobs_with_extra_top_tokens():
    # position 0 sampled 7 (rank 3) while 4 was the top token; position 1 sampled 9
    flat = _flat([{7: (-2.25, 3), 4: (-0.25, 1)}, {9: (-0.75, 1)}])
    assert sampled_logprobs([7, 9], flat) == pytest.approx([-2.25, -0.75])


def test_the_sampled_tokens_log_prob_is_read_from_per_position_dicts():
    positions = [{7: vf.Logprob(-2.25, 3), 4: vf.Logprob(-0.25, 1)}, {9: vf.Logprob(-0.75, 1)}]
    assert sampled_logprobs([7, 9], positions) == pytest.approx([-2.25, -0.75])


def test_missing_or_short_log_probs_are_errors():
    with pytest.raises(RuntimeError, match="no log-probs"):
        sampled_logprobs([7], None)
    with pytest.raises(RuntimeError, match="1 log-prob positions for 2 tokens"):
        sampled_logprobs([7, 9], _flat([{7: (-1.0, 1)}]))
    with pytest.raises(RuntimeError, match="lack the sampled token 9"):
        sampled_logprobs([9], _flat([{7: (-1.0, 1)}]))


# --- the engine and its weight syncs --------------------------------------------------------------------
def test_llm_arguments(tmp_path):
    eng = engine(tmp_path, gpu_memory_utilization=0.4, sleep_mode=True, vllm_dtype="float32", max_model_len=48)
    eng.follow_policy(eng.policy, 0)
    kw = vf.FakeLLM.instances[0].kwargs
    assert kw["enable_prefix_caching"] is True and kw["logprobs_mode"] == "raw_logprobs"
    assert kw["skip_tokenizer_init"] is True and kw["dtype"] == "float32" and kw["max_model_len"] == 48
    assert kw["gpu_memory_utilization"] == 0.4 and kw["enable_sleep_mode"] is True and kw["tensor_parallel_size"] == 1
    assert "enable_lora" not in kw and "distributed_executor_backend" not in kw
    assert vf.FakeLLM.instances[0].model_files == ["config.json", "generation_config.json", "model.safetensors"]  # the snapshot vLLM starts from
    assert not (tmp_path / "vllm" / "model").exists()  # removed once loaded


def test_lora_rank_bucket_is_the_smallest_allowed_rank_above():
    assert [lora_rank_bucket(r) for r in (1, 4, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]


def test_lora_policy_gets_a_new_adapter_and_lora_request_every_round(tmp_path):
    policy = lora_llama(r=4)
    eng = engine(tmp_path, policy)
    eng.follow_policy(policy, 0)
    llm = vf.FakeLLM.instances[0]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["max_loras"] == 1
    first = eng._lora
    assert (first.lora_name, first.lora_int_id) == ("gpo-policy-1", 1)
    assert sorted(p.name for p in Path(first.lora_path).iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]
    with torch.no_grad():  # a round of training moves the adapter
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    eng.follow_policy(policy, 1)
    second = eng._lora
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path and Path(second.lora_path).name == "002_round001"
    assert llm.llm_engine.removed == [1]  # the old adapter is dropped from vLLM
    saved = load_file(str(Path(second.lora_path) / "adapter_model.safetensors"))
    b = next(v for k, v in saved.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    live = dict(policy.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert torch.equal(b, live.detach())  # the file holds this round's adapter
    assert json.loads((Path(second.lora_path) / "adapter_config.json").read_text())["r"] == 4
    eng.generate([[1, 2]], [0], seed=0)
    assert llm.calls[-1]["lora"] is second  # generation uses the newest adapter
    assert [e[0] for e in llm.events].count("reset_prefix_cache") == 2
    assert not any(e[0] == "rpc" for e in llm.events)  # base weights never reloaded with adapters


def test_full_fine_tuning_loads_the_weights_in_place_and_resets_the_prefix_cache(tmp_path):
    policy = small_llama()
    eng = engine(tmp_path, policy, vllm_dtype="float32")
    eng.follow_policy(policy, 0)  # start: from the snapshot, nothing to reload
    llm = vf.FakeLLM.instances[0]
    assert [e[0] for e in llm.events] == ["reset_prefix_cache"]
    with torch.no_grad():
        policy.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    eng.follow_policy(policy, 1)
    (kind, method, kwargs), last = llm.events[1], llm.events[2]
    assert (kind, method, kwargs["is_checkpoint_format"]) == ("rpc", "reload_weights", True) and last == ("reset_prefix_cache",)
    sent = dict(kwargs["weights_iterator"])
    hf_names = {n for n, _ in policy.named_parameters()}
    assert set(sent) == hf_names
    assert torch.equal(sent["model.layers.1.mlp.down_proj.weight"], policy.model.layers[1].mlp.down_proj.weight)


def test_in_place_sync_casts_to_the_engine_dtype(tmp_path):
    policy = small_llama()
    eng = engine(tmp_path, policy)  # vllm_dtype defaults to bfloat16
    eng.follow_policy(policy, 0)
    eng.follow_policy(policy, 1)
    sent = dict(vf.FakeLLM.instances[0].events[1][2]["weights_iterator"])
    assert {t.dtype for t in sent.values()} == {torch.bfloat16}


def test_merged_lora_sync_loads_base_plus_delta_in_place(tmp_path):
    policy = lora_llama(r=4)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    eng = engine(tmp_path, policy, lora_sync="merged", vllm_dtype="float32")
    eng.follow_policy(policy, 0)
    eng.follow_policy(policy, 1)
    llm = vf.FakeLLM.instances[0]
    assert "enable_lora" not in llm.kwargs and eng._lora is None
    sent = dict(llm.events[1][2]["weights_iterator"])
    import copy

    merged = copy.deepcopy(policy).merge_and_unload()
    assert set(sent) == {n for n, _ in merged.named_parameters()}
    assert all(torch.allclose(sent[n], p, atol=1e-6) for n, p in merged.named_parameters())


def test_sleep_mode_sleeps_while_training_and_wakes_before_the_next_sync(tmp_path):
    policy = small_llama()
    eng = engine(tmp_path, policy, sleep_mode=True)
    eng.follow_policy(policy, 0)
    eng.release()
    eng.follow_policy(policy, 1)
    kinds = [e[:2] if e[0] != "rpc" else ("rpc",) for e in vf.FakeLLM.instances[0].events]
    assert kinds == [("reset_prefix_cache",), ("sleep", 2), ("wake_up", ["weights"]), ("rpc",),
                     ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]
    lora = lora_llama()
    eng = engine(tmp_path, lora, sleep_mode=True)
    eng.follow_policy(lora, 0)
    eng.release()
    eng.release()  # already asleep: once
    eng.generate([[1, 2]], [0], seed=0)  # generating wakes it (and syncs) by itself
    kinds = [e[:2] for e in vf.FakeLLM.instances[0].events]
    assert kinds == [("reset_prefix_cache",), ("sleep", 1), ("wake_up", None), ("reset_prefix_cache",), ("generate",)]


def test_release_without_sleep_mode_does_nothing(tmp_path):
    eng = engine(tmp_path)
    eng.follow_policy(eng.policy, 0)
    eng.release()
    assert [e[0] for e in vf.FakeLLM.instances[0].events] == ["reset_prefix_cache"]
