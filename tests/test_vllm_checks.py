"""engine.backend=vllm: what vLLM 0.33.0 would refuse is refused at start in one line, and the stand-ins
refuse it too (tests/vllm_fakes.py cites the vLLM file each rule mirrors).

  - LoRA adapters with float32 weights, or on an architecture vLLM cannot serve with LoRA (GPT-2)
  - engine.max_model_len: null sizes the KV cache for the round's longest sequence, not the model's
    whole context; a value below that need or above the context stops at start
  - temperatures above 2
  - no autocast around any call into vLLM; torch's float32 matmul precision survives the engine start
  - vLLM stops only at the engine's eos (the generation config it reads says so)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import vllm_fakes as vf
from gpo_exp.models.config import ModelConfig
from gpo_exp.rollout import vllm_engine as ve
from gpo_exp.rollout.backends import check_backend, config_architecture
from gpo_exp.rollout.engine import EngineConfig
from gpo_exp.rollout.vllm_engine import (VLLMRolloutEngine, VLLMUnavailable, check_available, check_config,
                                         needed_model_len, resolve_max_model_len, sampling_kwargs)
from gpo_exp.rollout.vllm_lora_archs import LORA_ARCHITECTURES, NO_LORA_ARCHITECTURES, derive, supports_lora

EOS = 2
ROOT = Path(__file__).resolve().parent.parent


def llama(context: int = 64, eos: int = EOS, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    conf = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50, max_position_embeddings=context, eos_token_id=eos,
                       tie_word_embeddings=False)
    return LlamaForCausalLM(conf).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64)).eval()


def lora(model, r: int = 4, targets=("q_proj", "v_proj")):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets)))


def engine(tmp_path: Path, policy, **cfg) -> VLLMRolloutEngine:
    max_prompt_len = cfg.pop("max_prompt_len", None)
    vf.FakeLLM.instances.clear()
    return VLLMRolloutEngine(policy, eos_id=EOS, pad_id=0, cfg=EngineConfig(backend="vllm", **cfg),
                             work_dir=tmp_path / "vllm", default_max_new_tokens=6, api=vf.fake_api(),
                             max_prompt_len=max_prompt_len)


def one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


# --- LoRA: dtype and architecture ---------------------------------------------------------------------
def test_lora_adapters_in_float32_are_refused_before_anything_else(monkeypatch):
    monkeypatch.setattr(ve, "installed_version", lambda: None)  # the config error comes first, vLLM or not
    with pytest.raises(VLLMUnavailable) as e:
        check_available(EngineConfig(backend="vllm", vllm_dtype="float32"), lora_r=8)
    one_line(e, "engine.vllm_dtype=float32", "model.lora_r=8", "bfloat16", "engine.lora_sync=merged")
    for ok in (dict(vllm_dtype="bfloat16"), dict(vllm_dtype="auto"), dict(vllm_dtype="float32", lora_sync="merged")):
        check_config(EngineConfig(backend="vllm", **ok), lora_r=8)
    check_config(EngineConfig(backend="vllm", vllm_dtype="float32"), lora_r=0)  # no LoRA kernels without LoRA


def test_lora_on_an_architecture_vllm_cannot_serve_with_lora_is_refused(monkeypatch):
    monkeypatch.setattr(ve, "installed_version", lambda: None)
    tiny = ModelConfig()  # the default tiny model: GPT-2
    assert config_architecture(tiny) == "GPT2LMHeadModel"
    with pytest.raises(VLLMUnavailable) as e:
        check_backend(EngineConfig(backend="vllm"), lora_r=8, model=tiny)
    one_line(e, "model.lora_r=8", "GPT2LMHeadModel", "engine.lora_sync=merged", "Qwen2ForCausalLM")
    for arch_ok in (ModelConfig(arch="llama"), ModelConfig(source="random", path="Qwen/Qwen2.5-1.5B-Instruct")):
        check_config(EngineConfig(backend="vllm"), 8, config_architecture(arch_ok))
    check_config(EngineConfig(backend="vllm", lora_sync="merged"), 8, "GPT2LMHeadModel")  # no LoRA in vLLM: fine
    check_config(EngineConfig(backend="vllm"), 0, "GPT2LMHeadModel")  # full fine-tuning: fine


def test_a_loaded_lora_policy_of_an_unsupported_architecture_is_refused_at_engine_build(tmp_path):
    with pytest.raises(VLLMUnavailable) as e:
        engine(tmp_path, lora(gpt2(), targets=("c_attn",)))
    one_line(e, "GPT2LMHeadModel", "engine.lora_sync=merged")
    eng = engine(tmp_path, lora(gpt2(), targets=("c_attn",)), lora_sync="merged")  # served as merged weights
    eng.follow_policy(eng.policy, 0)
    assert "enable_lora" not in vf.FakeLLM.instances[0].kwargs


def test_the_lora_architecture_table_holds_the_project_models_and_not_gpt2():
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert supports_lora(arch) is True
    assert supports_lora("GPT2LMHeadModel") is False and supports_lora("NotInVllmForCausalLM") is None
    assert not LORA_ARCHITECTURES & NO_LORA_ARCHITECTURES


def test_derive_follows_bases_through_imports_and_registry_tables(tmp_path):
    models = tmp_path / "vllm" / "model_executor" / "models"
    (tmp_path / "vllm" / "models" / "newpkg").mkdir(parents=True)
    models.mkdir(parents=True)
    (models / "interfaces.py").write_text("class SupportsLoRA: ...\nclass SupportsPP: ...\n")
    (models / "llama.py").write_text("from .interfaces import SupportsLoRA, SupportsPP\n"
                                     "class LlamaForCausalLM(nn.Module, SupportsLoRA, SupportsPP): ...\n")
    (models / "mistral.py").write_text("from vllm.model_executor.models.llama import LlamaForCausalLM\n"
                                       "class MistralForCausalLM(LlamaForCausalLM): ...\n")
    (models / "gpt2.py").write_text("from .interfaces import SupportsPP\nclass GPT2LMHeadModel(nn.Module, SupportsPP): ...\n")
    (models / "flagged.py").write_text("class FlaggedForCausalLM:\n    supports_lora = True\n")
    (tmp_path / "vllm" / "models" / "newpkg" / "__init__.py").write_text(
        "if cuda:\n    from .nvidia import NewForCausalLM\nelse:\n    from .other import NewForCausalLM\n")
    (tmp_path / "vllm" / "models" / "newpkg" / "nvidia.py").write_text(
        "from vllm.model_executor.models.interfaces import SupportsLoRA\nclass NewForCausalLM(SupportsLoRA): ...\n")
    (models / "registry.py").write_text(
        '_TEXT_GENERATION_MODELS = {"LlamaForCausalLM": ("llama", "LlamaForCausalLM"),\n'
        '  "MistralForCausalLM": ("mistral", "MistralForCausalLM"), "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),\n'
        '  "NewForCausalLM": ("vllm.models.newpkg", "NewForCausalLM")}\n'
        '_TRANSFORMERS_SUPPORTED_MODELS = {"FlaggedForCausalLM": ("flagged", "FlaggedForCausalLM")}\n'
        '_EMBEDDING_MODELS = {"BertModel": ("bert", "BertModel")}\n')
    yes, no = derive(tmp_path / "vllm")
    assert yes == {"LlamaForCausalLM", "MistralForCausalLM", "NewForCausalLM", "FlaggedForCausalLM"}
    assert no == {"GPT2LMHeadModel"}


def test_the_stand_in_refuses_what_vllm_refuses_for_lora(tmp_path):
    from gpo_exp.rollout.vllm_sync import save_model_dir

    def start(model, dtype, **kw):
        d = save_model_dir(model, tmp_path / f"m{len(list(tmp_path.iterdir()))}", dtype)
        return vf.FakeLLM(model=str(d), dtype=kw.pop("vllm_dtype", "auto"), **kw)

    with pytest.raises(ValueError, match="GPT2LMHeadModel does not support LoRA yet"):
        start(gpt2(), torch.bfloat16, enable_lora=True, max_lora_rank=8)
    with pytest.raises(AssertionError, match="not fp16/bf16"):
        start(llama(), torch.float32, vllm_dtype="float32", enable_lora=True, max_lora_rank=8)
    with pytest.raises(AssertionError, match="max_lora_rank"):
        start(llama(), torch.bfloat16, enable_lora=True, max_lora_rank=4)
    assert start(llama(), None, enable_lora=True, max_lora_rank=8).dtype == "bfloat16"  # auto: fp32 downcast


# --- max_model_len and the KV cache ---------------------------------------------------------------------
def test_max_model_len_defaults_to_the_rounds_longest_sequence(tmp_path):
    assert needed_model_len(100, 64) == 228  # a continuation (64) of the longest prefix (100 + up to 64)
    assert resolve_max_model_len(EngineConfig(backend="vllm"), 100, 64, 131_072) == 228
    assert resolve_max_model_len(EngineConfig(backend="vllm"), 100, 64, 200) == 200  # capped at the context
    assert resolve_max_model_len(EngineConfig(backend="vllm", max_model_len=512), 100, 64, 131_072) == 512
    eng = engine(tmp_path, llama(context=4096), max_prompt_len=10, max_new_tokens=5)
    eng.follow_policy(eng.policy, 0)
    assert vf.FakeLLM.instances[0].kwargs["max_model_len"] == 20


def test_max_model_len_below_the_need_or_above_the_context_stops_in_one_line(tmp_path):
    with pytest.raises(VLLMUnavailable) as e:
        engine(tmp_path, llama(context=4096), max_prompt_len=10, max_new_tokens=5, max_model_len=19)
    one_line(e, "engine.max_model_len=19", ">= 20", "10 tokens", "max_new_tokens=5")
    with pytest.raises(VLLMUnavailable) as e:
        engine(tmp_path, llama(context=64), max_model_len=65)
    one_line(e, "engine.max_model_len=65", "<= the model's context of 64")


def test_the_models_whole_context_would_not_fit_the_kv_cache_but_the_rounds_need_does(tmp_path, monkeypatch):
    # 131,072 tokens x 2 (K, V) x 2 layers x 2 kv heads x 8 dims x 2 bytes = 16 MiB of KV cache; the card
    # simulated here leaves 0.3 x 20 MiB - weights for it, as a 7B policy leaves little of an 80 GB card
    monkeypatch.setattr(vf.FakeLLM, "gpu_bytes", 20 * 2**20)
    with pytest.raises(ValueError, match=r"max seq len \(131072\)"):  # what a null max_model_len meant before
        vf.FakeLLM(model=str(_model_dir(tmp_path, llama(context=131_072))), dtype="bfloat16",
                   gpu_memory_utilization=0.3)
    eng = engine(tmp_path, llama(context=131_072), max_prompt_len=300, max_new_tokens=256)
    eng.follow_policy(eng.policy, 0)
    assert vf.FakeLLM.instances[0].max_model_len == 812


def _model_dir(tmp_path: Path, model) -> Path:
    from gpo_exp.rollout.vllm_sync import save_model_dir

    return save_model_dir(model, tmp_path / "snapshot", torch.bfloat16, eos_id=EOS)


def test_the_stand_in_caps_samples_at_max_model_len_and_refuses_too_long_prompts(tmp_path):
    eng = engine(tmp_path, llama(context=64), max_model_len=12, max_new_tokens=50)
    gens = eng.generate([[1, 3, 4, 5, 6, 7, 8, 9, 10, 11]] * 8, list(range(8)), seed=0)
    assert all(len(g.ids) <= 2 for g in gens) and any(not g.finished for g in gens)
    with pytest.raises(ValueError, match="maximum model length of 12"):
        eng.generate([list(range(1, 13))], [0], seed=0)


# --- sampling values ------------------------------------------------------------------------------------
def test_temperatures_above_two_are_refused_at_start(monkeypatch):
    monkeypatch.setattr(ve, "installed_version", lambda: None)
    with pytest.raises(VLLMUnavailable) as e:
        check_available(EngineConfig(backend="vllm", temperature=2.5))
    one_line(e, "engine.temperature=2.5", "[0, 2]")
    with pytest.raises(VLLMUnavailable) as e:
        check_config(EngineConfig(backend="vllm"), temperatures=[3.0])
    one_line(e, "estimator.temperature=3.0")
    check_config(EngineConfig(backend="vllm", temperature=2.0), temperatures=[None, 0.5])


@pytest.mark.parametrize("field,value", [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0.0),
                                         ("top_k", -2), ("max_tokens", 0), ("logprobs", -2), ("min_p", 1.5),
                                         ("presence_penalty", 3.0), ("repetition_penalty", 0.0)])
def test_the_stand_in_sampling_params_check_values_as_vllm_does(field, value):
    kw = sampling_kwargs(1, greedy=False, temperature=1.0, top_p=1.0, max_tokens=4, eos_id=EOS)
    with pytest.raises(ValueError):
        vf.SamplingParams(**{**kw, field: value})


def test_the_stand_in_sampling_params_normalise_as_vllm_does():
    sp = vf.SamplingParams(seed=-1, temperature=0.0, top_p=0.5, top_k=5, stop_token_ids=[2, 2, 3])
    assert sp.seed is None and (sp.top_p, sp.top_k) == (1.0, 0) and list(sp.stop_token_ids) == [2, 3]
    with pytest.raises(ValueError, match="n must be 1"):
        vf.SamplingParams(n=2, temperature=0.0)
    kw = sampling_kwargs(2**32 - 1, greedy=True, temperature=0.7, top_p=0.9, max_tokens=8, eos_id=EOS)
    assert vf.SamplingParams(**kw).seed == 2**32 - 1  # the engine's keys are 32-bit: vLLM's int64 slot holds them


def test_vllm_stops_only_at_the_engines_eos(tmp_path):
    eng = engine(tmp_path, llama(eos=7))  # config.json says eos 7; the tokenizer (engine) says 2
    eng.follow_policy(eng.policy, 0)
    llm = vf.FakeLLM.instances[0]
    assert llm.generation_config["eos_token_id"] == EOS
    eng.generate([[1, 3]] * 4, [0, 1, 2, 3], seed=0)
    assert all(stop == [EOS] for stop in llm.calls[0]["stops"])


# --- process state: autocast, matmul precision ---------------------------------------------------------
def test_no_autocast_reaches_vllm(tmp_path):
    policy = llama()
    eng = engine(tmp_path, policy, sleep_mode=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's precision context around generation
        eng.generate([[1, 3]], [0], seed=0)  # starts the engine, then generates
        eng.release()
        eng.follow_policy(policy, 1)  # an in-place sync (collective_rpc)
        eng.generate([[1, 3]], [1], seed=0)
        assert torch.is_autocast_enabled("cpu")  # restored for the caller
    llm = vf.FakeLLM.instances[0]
    assert len(llm.autocast) == 4 and not any(llm.autocast)


def test_the_float32_matmul_precision_survives_the_engine_start(tmp_path):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        eng = engine(tmp_path, llama())
        eng.follow_policy(eng.policy, 0)  # the worker sets VLLM_FLOAT32_MATMUL_PRECISION's value
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# --- the run ------------------------------------------------------------------------------------------------
def test_gpo_run_with_lora_on_the_tiny_gpt2_stops_at_start_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpo_exp.run", "engine=vllm", "model.lora_r=8", "logger.wandb=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "GPT2LMHeadModel" in errors[0] and "engine.lora_sync=merged" in errors[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_the_longest_prompt_is_measured_as_the_sampler_encodes_prompts(tmp_path):
    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.models.tiny import char_tokenizer
    from gpo_exp.rollout.backends import build_engine, longest_prompt
    from gpo_exp.rollout.sampler import PolicySampler

    bench = BENCHMARKS.build({"name": "arith"})
    rows = bench.load("train")[:30]
    tok = char_tokenizer([bench.prompt(r) for r in rows] + ["0123456789"])
    sampler = PolicySampler(None, tok, bench, bench.cfg.steps)
    n = longest_prompt(tok, bench, rows, True)
    assert n == max(len(sampler.encode(r)) for r in rows) and n > 5
    eng = build_engine(EngineConfig(backend="vllm"), llama(context=4096), tok, 7, tmp_path, max_prompt_len=n)
    assert eng.max_model_len == n + 14


def test_the_install_command_resolves_to_the_vllm_this_backend_was_written_against():
    """`pip install -e ".[vllm]"` (no constraints file) resolved vllm 0.33.0, torch 2.14.0, transformers 5.20.2
    (`pip install -e ".[vllm]" --dry-run --ignore-installed`, docs/vllm.md): pyproject's ranges must keep
    admitting that set, and the one-line error must name that command."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["vllm"]}
    resolved = {"vllm": ve.VLLM_VERSION, "torch": "2.14.0", "transformers": "5.20.2"}
    assert all(reqs[name].specifier.contains(v) for name, v in resolved.items()), reqs
    assert ve.INSTALL == 'pip install -e ".[vllm]"'


def test_the_gpu_integration_tests_engines_pass_the_stand_ins_checks(tmp_path, monkeypatch):
    """The engines tests/test_vllm_integration.py starts on a GPU, started here against the stand-ins: a
    setting vLLM would refuse (LoRA in fp32, a max_model_len past the context) fails on the CPU already."""
    import peft

    import test_vllm_integration as vi

    monkeypatch.setattr(ve, "load_api", vf.fake_api)
    policy, tok, _ = vi.small_model("cpu", smollm2=False)
    _, vl = vi.engines(policy, tok, tmp_path / "full", max_new=48)
    assert vl.generate([[1, 5, 6]], [0], seed=0)[0].ids
    lora = peft.get_peft_model(policy, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    _, vl = vi.engines(lora, tok, tmp_path / "lora", max_new=24, vllm_dtype="bfloat16")
    assert vf.FakeLLM.instances[-1].kwargs["enable_lora"] and vl.generate([[1, 5, 6]], [0], seed=0)[0].ids
