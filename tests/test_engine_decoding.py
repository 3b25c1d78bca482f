"""HFRolloutEngine's decoding loop against the previous one (tests/engine_reference.py): preallocated
vs dynamic KV cache, with and without compaction, greedy and sampled, top-p, mixed prefix lengths,
duplicate requests; the blocked CDF search; host reads per step; engine.dtype; engine.compile."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.tiny import char_tokenizer, tiny_model
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine, choose_tokens, nucleus_candidates, search_cdf

import engine_reference as ref

LIMIT = 24
CACHES = [  # every way the loop can run: cache kind x how often the host looks x when it compacts
    dict(),  # preallocated, on the CPU: a check every step, compaction as soon as a row finished
    dict(sync_every=8, compact_below=0.5),  # the accelerator schedule: compaction once half the rows finished
    dict(sync_every=3, compact_below=0.0),  # never compacted
    dict(kv_cache="static"),
    dict(kv_cache="static", sync_every=8, compact_below=0.5),
    dict(kv_cache="dynamic", sync_every=8, compact_below=0.5),
    dict(kv_cache="dynamic", sync_every=1, compact_below=1.0),  # the previous loop's schedule
    dict(batch_size=5, sync_every=2),  # several batches, the last one short
]
SAMPLING = [pytest.param(dict(), id="t1", marks=pytest.mark.slow), pytest.param(dict(temperature=0.7, top_p=0.9), id="t0.7-p0.9"),
            pytest.param(dict(temperature=1.3, top_p=0.5), id="t1.3-p0.5", marks=pytest.mark.slow),
            pytest.param(dict(temperature=0.0), id="greedy")]


@pytest.fixture(scope="module")
def data():
    bench = get("arith", sizes={"train": 0, "val": 20, "test": 0})
    rows = bench.load("val")
    tok = char_tokenizer([bench.prompt(r) + r["solution"] for r in rows])
    prefixes = [tok(bench.prompt(r) + r["solution"][: 4 * i]).input_ids for i, r in enumerate(rows[:12])]
    # 3 samples of each of 12 prefixes of mixed lengths, and two requests asked twice (deduplicated)
    pre = [p for p in prefixes for _ in range(3)] + [prefixes[0], prefixes[5]]
    sid = [j for _ in prefixes for j in range(3)] + [0, 2]
    return tok, pre, sid


def qwen2(tok, lm_scale: float) -> Qwen2ForCausalLM:
    """A random Qwen2-shaped model with a 6000-token vocabulary (> GUMBEL_MAX_VOCAB: inverse-CDF sampling).
    lm_scale 25 makes its next-token distributions peaked (a nucleus of a few tokens), 1 leaves them flat;
    eos logits x40 make rows finish at different steps."""
    conf = Qwen2Config(vocab_size=6000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(conf).eval()
    with torch.no_grad():
        model.lm_head.weight *= lm_scale
        model.lm_head.weight[tok.eos_token_id] *= 40 / lm_scale ** 0.5
    return model


MODELS = {
    "gpt2": lambda tok: tiny_model(ModelConfig(n_layer=2, n_embd=32, n_head=2, max_len=128), tok),
    "llama": lambda tok: tiny_model(ModelConfig(arch="llama", n_layer=2, n_embd=32, n_head=2, max_len=128), tok),
    "qwen2": lambda tok: qwen2(tok, 25.0),
}


def build(name, tok):
    torch.manual_seed(0)
    return MODELS[name](tok).eval()


def run(model, tok, pre, sid, seed=11, **kw):
    eng = HFRolloutEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          cfg=EngineConfig(**{"batch_size": 64, **kw}), default_max_new_tokens=LIMIT)
    return eng.generate(pre, sid, seed=seed)


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_cache_schedule_gives_the_previous_engines_samples(data, name, sampling):
    tok, pre, sid = data
    model = build(name, tok)
    want = ref.generate(model, tok.eos_token_id, tok.pad_token_id, EngineConfig(batch_size=64, **sampling), LIMIT,
                        pre, sid, seed=11)
    assert len({len(g.ids) for g in want}) >= 2  # rows stop at different steps: the compaction paths run
    for cache in CACHES:
        got = run(model, tok, pre, sid, **{**sampling, **cache})
        assert [g.ids for g in got] == [g.ids for g in want], cache
        assert [g.finished for g in got] == [g.finished for g in want], cache
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4), cache


def test_flat_large_nucleus_is_the_same_up_to_logit_rounding(data):
    """A flat 6000-token distribution puts thousands of CDF boundaries ~1e-4 apart, so the ~1e-7 logit
    rounding between cache layouts can move a draw across one: rarely, never in the same-ops schedule."""
    tok, pre, sid = data
    model = qwen2(tok, 1.0)
    for sampling in (dict(), dict(temperature=1.3, top_p=0.5)):
        want = ref.generate(model, tok.eos_token_id, tok.pad_token_id, EngineConfig(batch_size=64, **sampling),
                            LIMIT, pre, sid, seed=11)
        same_ops = run(model, tok, pre, sid, kv_cache="dynamic", sync_every=1, compact_below=1.0, **sampling)
        assert [g.ids for g in same_ops] == [g.ids for g in want]
        for kv_cache in ("prealloc", "static"):
            got = run(model, tok, pre, sid, kv_cache=kv_cache, **sampling)
            assert sum(g.ids == w.ids for g, w in zip(got, want)) >= len(want) - 3


# --- sampling without a scan over the vocabulary ----------------------------------------------------

@pytest.mark.parametrize("n", [900, 5000, 6144, 50257])  # one cumsum; padded blocks; 256-blocks; GPT-2's vocab
@pytest.mark.parametrize("right", [True, False])
def test_search_cdf_equals_a_full_float64_cumsum(n, right):
    g = torch.Generator().manual_seed(n)
    probs = torch.rand(6, n, generator=g) ** 8
    probs[:, torch.randperm(n, generator=g)[: n // 3]] = 0  # zero-probability columns never win
    probs[0, n // 2:] = 0  # a row whose mass sits in its first half
    probs = probs / probs.sum(-1, keepdim=True)
    cdf = probs.double().cumsum(-1)
    for _ in range(20):
        target = torch.rand(6, generator=g, dtype=torch.float64) * cdf[:, -1]
        idx, val = search_cdf(probs, target, right=right)
        want = torch.searchsorted(cdf, target[:, None], right=right).squeeze(1).clamp(max=n - 1)
        assert torch.equal(idx, want)
        assert torch.allclose(val, cdf.gather(-1, want[:, None]).squeeze(1), rtol=0, atol=1e-12)
        assert bool((probs.gather(-1, idx[:, None]) > 0).all())


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.6])
def test_choose_tokens_equals_the_previous_sampler(top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 49152, generator=g) * torch.linspace(0.5, 12, 64)[:, None]  # flat to peaked rows
    keys = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64)
    for step in (0, 5):
        got = choose_tokens(logits, keys, step, 0.8, top_p, False)
        assert torch.equal(got, ref.choose_tokens(logits, keys, step, 0.8, top_p, False))


def test_nucleus_search_reads_nothing_back_from_an_accelerator():
    """Off the CPU the nucleus is found by one full sort (no host check of how many tokens it needs):
    a 'meta' tensor has no values, so any read would raise."""
    assert nucleus_candidates(torch.empty(4, 50000, device="meta"), 0.9) == 50000
    peaked = torch.zeros(3, 50000)
    peaked[:, :5] = 1.0
    assert nucleus_candidates(peaked / 5, 0.9) == 64  # CPU: a partial sort holds it
    assert nucleus_candidates(torch.full((3, 50000), 1 / 50000), 0.9) == 50000


def test_host_reads_every_sync_every_steps(data, monkeypatch):
    """Finished rows are found on the device; the host looks only every `sync_every` steps (and
    transformers' mask builder does not look at every step either: the preallocated cache says it is
    compileable, as a StaticCache does)."""
    tok, pre, sid = data
    model = build("gpt2", tok)
    reads = {"n": 0}
    for name in ("__int__", "__bool__", "item"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    for every, kv_cache in ((1, "prealloc"), (4, "prealloc"), (4, "static")):
        reads["n"] = calls["n"] = 0
        run(model, tok, pre[:12], sid[:12], sync_every=every, kv_cache=kv_cache, temperature=0.0, seed=0)
        steps = calls["n"] - 1  # decode steps after the prefill
        assert steps >= 8
        # + 2: transformers' mask builder checks the prefill's padding once per batch
        assert reads["n"] <= steps // every + 2, (every, reads["n"], steps)


# --- engine.dtype and engine.compile ----------------------------------------------------------------

@pytest.mark.parametrize("kv_cache", ["prealloc", "static", "dynamic"])
def test_bf16_engine_autocasts_a_fp32_policy_and_keeps_fp32_logprobs(data, kv_cache):
    tok, pre, sid = data
    model = build("llama", tok)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    gens = run(model, tok, pre[:9], sid[:9], dtype="bfloat16", kv_cache=kv_cache)
    handle.remove()
    assert set(seen) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy's weights are untouched
    for p, g in zip(pre[:9], gens):
        seq = torch.tensor([p + g.ids])
        with torch.no_grad():
            tf = model(seq).logits[0, len(p) - 1:-1].log_softmax(-1).gather(-1, seq[0, len(p):, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logprobs), tf, atol=0.1)  # bf16 logits, fp32 log-softmax
    seen.clear()
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    run(model, tok, pre[:3], sid[:3], dtype="auto")
    handle.remove()
    assert set(seen) == {torch.float32}


def test_engine_dtype_cannot_widen_the_policys_weights(data):
    tok, pre, sid = data
    model = build("gpt2", tok).to(torch.bfloat16)
    with pytest.raises(ConfigError, match=r"^bad config engine.dtype='float32': the policy's weights are torch.bfloat16"):
        run(model, tok, pre[:3], sid[:3], dtype="float32")
    assert len(run(model, tok, pre[:3], sid[:3], dtype="auto")) == 3


def test_default_schedule_follows_the_device(data):
    tok, _, _ = data
    eng = HFRolloutEngine(build("gpt2", tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert eng._schedule(torch.device("cpu")) == (1, 1.0)
    assert eng._schedule(torch.device("cuda")) == (8, 0.5)
    eng.cfg = EngineConfig(sync_every=3, compact_below=0.25)
    assert eng._schedule(torch.device("cuda")) == (3, 0.25)
    eng.cfg = EngineConfig(compile=True, kv_cache="static")
    assert eng._schedule(torch.device("cuda")) == (8, 0.0)  # a compiled step keeps its batch size


def test_bad_decoding_config():
    for kw, msg in [(dict(kv_cache="paged"), "engine.kv_cache='paged': must be one of prealloc, static, dynamic"), (dict(sync_every=0), "engine.sync_every=0"),
                    (dict(compact_below=1.5), "engine.compact_below=1.5"), (dict(dtype="fp8"), "engine.dtype='fp8'"),
                    (dict(compile=True), "engine.compile=True: must be false with engine.kv_cache=prealloc")]:
        with pytest.raises(ConfigError, match=f"^bad config {msg}"):
            EngineConfig(**kw)


def test_compile_without_a_cpu_compiler_stops_in_one_line(data, monkeypatch):
    tok, pre, sid = data
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^bad config engine.compile=True: torch.compile on the CPU needs a C\+\+ "):
        run(build("gpt2", tok), tok, pre[:2], sid[:2], compile=True, kv_cache="static")


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_samples(data):
    tok, pre, sid = data
    model = build("llama", tok)
    want = run(model, tok, pre, sid)
    eng = HFRolloutEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          cfg=EngineConfig(compile=True, kv_cache="static", batch_size=64),
                          default_max_new_tokens=LIMIT)
    assert [g.ids for g in eng.generate(pre, sid, seed=11)] == [g.ids for g in want]
    assert [g.ids for g in eng.generate(pre[:7], sid[:7], seed=11)] == [g.ids for g in want[:7]]  # another shape
