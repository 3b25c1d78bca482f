"""HFRolloutEngine: reproducible per-sample randomness, batching invariance, dedup, greedy, limits."""
from __future__ import annotations

import math

import pytest
import torch

from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.tiny import char_tokenizer, tiny_model
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.engine import (EngineConfig, HFRolloutEngine, choose_tokens, gumbel_noise, sample_keys)

LIMIT = 16


@pytest.fixture(scope="module")
def setup():
    bench = get("arith", sizes={"train": 0, "val": 20, "test": 0})
    rows = bench.load("val")
    tok = char_tokenizer([bench.prompt(r) + r["solution"] for r in rows])
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(n_layer=2, n_embd=32, n_head=2, max_len=128), tok).eval()
    # Prompts plus partial solutions: 12 prefixes of different lengths.
    prefixes = [tok(bench.prompt(r) + r["solution"][: 4 * i]).input_ids for i, r in enumerate(rows[:12])]
    return model, tok, prefixes


def engine(setup, **kw) -> HFRolloutEngine:
    model, tok, _ = setup
    return HFRolloutEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, cfg=EngineConfig(**kw),
                           default_max_new_tokens=LIMIT)


def requests(prefixes):
    """Two samples of each prefix, and sample 0 of the first three asked twice."""
    reqs = [(p, j) for p in prefixes for j in (0, 1)] + [(p, 0) for p in prefixes[:3]]
    return [r[0] for r in reqs], [r[1] for r in reqs]


# --- the hash behind the noise --------------------------------------------------------------------

def _mix32_ref(x: int) -> int:
    m = 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & m
    x = ((x ^ (x >> 15)) * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_gumbel_noise_matches_exact_32bit_reference():
    """The int64 tensor arithmetic may wrap; the noise must still equal exact 32-bit hashing."""
    keys = [0, 1, 123, 2**31, 2**32 - 1]
    noise = gumbel_noise(torch.tensor(keys), 5, 7)
    for i, k in enumerate(keys):
        for t in range(7):
            h = _mix32_ref(_mix32_ref((k * 0x9E3779B1 + 5 * 0x85EBCA77 + t * 0xC2B2AE3D) & 0xFFFFFFFF) ^ k)
            assert noise[i, t].item() == pytest.approx(-math.log(-math.log((h + 0.5) / 2**32)), abs=1e-6)
    assert noise[2, :4].tolist() == pytest.approx([-0.87794, 1.56004, -1.09141, -0.13458], abs=1e-5)  # golden, key 123


def test_sample_keys_are_stable():
    # Python's int-tuple hash does not depend on PYTHONHASHSEED, so keys are the same in every run.
    assert sample_keys([[1, 2, 3], [1, 2, 3], [4]], [0, 1, 0], 7) == [3847011009, 3367065491, 3533082825]


# --- sampling distribution ------------------------------------------------------------------------

def padded(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """`logits` followed by -inf (never sampled) up to `vocab` entries: selects the sampling scheme."""
    return torch.cat([logits, torch.full((vocab - len(logits),), float("-inf"))]) if vocab > len(logits) else logits


SCHEMES = pytest.mark.parametrize("vocab", [0, 5000], ids=["gumbel", "inverse-cdf"])  # 5000 > GUMBEL_MAX_VOCAB


@SCHEMES
def test_choose_tokens_matches_softmax(vocab):
    n = 200_000 if vocab == 0 else 20_000
    logits = padded(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), vocab)
    p = (logits / 0.7).softmax(-1)
    keys = torch.arange(n, dtype=torch.int64) * 7919  # any distinct keys
    tok0 = choose_tokens(logits.expand(n, -1), keys, 0, 0.7, 1.0, False)
    tok7 = choose_tokens(logits.expand(n, -1), keys, 7, 0.7, 1.0, False)
    p = p[:6]
    for tok in (tok0, tok7):
        assert tok.max().item() < 6  # an impossible (-inf) token is never drawn
        counts = torch.bincount(tok, minlength=6).double()
        chi2 = ((counts - n * p.double()) ** 2 / (n * p.double())).sum().item()
        assert chi2 < 20.5  # chi-square, 5 dof: p = 0.001
        assert (counts / n - p.double()).abs().max().item() < 5 * (0.25 / n) ** 0.5  # ~5 sigma
    # Steps draw independent noise: P(same token at steps 0 and 7) = sum p^2.
    assert (tok0 == tok7).double().mean().item() == pytest.approx((p**2).sum().item(), abs=5 * (0.25 / n) ** 0.5)


@SCHEMES
def test_top_p_stays_in_nucleus(vocab):
    n = 100_000 if vocab == 0 else 20_000
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = padded(probs.log()[[3, 0, 4, 1, 2]], vocab)  # shuffled: nucleus membership must not depend on position
    keys = torch.arange(n, dtype=torch.int64)
    tok = choose_tokens(logits.expand(n, -1), keys, 0, 1.0, 0.7, False)
    sigma5 = 5 * (0.25 / n) ** 0.5
    counts = torch.bincount(tok, minlength=5) / n
    assert set(tok.unique().tolist()) == {1, 3}  # the 0.5 and 0.3 tokens: the smallest set reaching 0.7
    assert counts[1].item() == pytest.approx(0.5 / 0.8, abs=sigma5)
    tok = choose_tokens(logits.expand(n, -1), keys, 0, 1.0, 0.85, False)
    assert set(tok.unique().tolist()) == {1, 3, 4}  # 0.5 + 0.3 < 0.85, so the 0.1 token joins
    assert (torch.bincount(tok, minlength=5)[4] / n).item() == pytest.approx(0.1 / 0.9, abs=sigma5)


def test_inverse_cdf_draw_of_a_row_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 6000, generator=g) * 3
    keys = torch.randint(0, 2**32, (16,), generator=g, dtype=torch.int64)
    for top_p in (1.0, 0.9):
        whole = choose_tokens(logits, keys, 3, 0.7, top_p, False)
        alone = torch.cat([choose_tokens(logits[i:i + 1], keys[i:i + 1], 3, 0.7, top_p, False) for i in range(16)])
        assert torch.equal(whole, alone) and len(set(whole.tolist())) > 8


def test_greedy_and_zero_temperature_take_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, -1.0, 4.9]])
    keys = torch.tensor([1, 2])
    assert choose_tokens(logits, keys, 0, 1.0, 1.0, True).tolist() == [1, 0]
    assert choose_tokens(logits, keys, 0, 0.0, 1.0, False).tolist() == [1, 0]


# --- engine ---------------------------------------------------------------------------------------

def test_determinism(setup):
    _, _, prefixes = setup
    eng = engine(setup)
    a = eng.generate(prefixes[:6], [0] * 6, seed=0)
    b = eng.generate(prefixes[:6], [0] * 6, seed=0)
    assert [g.ids for g in a] == [g.ids for g in b]
    c = eng.generate(prefixes[:6], [0] * 6, seed=1)
    assert sum(x.ids != y.ids for x, y in zip(a, c)) == 6  # another seed: every sample differs
    d = eng.generate([prefixes[0]] * 6, list(range(6)), seed=0)
    assert len({tuple(g.ids) for g in d}) == 6  # sample ids 0..5 of one prefix: six different samples
    assert d[0].ids == a[0].ids


def test_per_call_temperature_equals_a_configured_one(setup):
    _, _, prefixes = setup
    at_half = engine(setup, temperature=0.5).generate(prefixes[:6], [0] * 6, seed=0)
    override = engine(setup).generate(prefixes[:6], [0] * 6, seed=0, temperature=0.5)
    at_one = engine(setup).generate(prefixes[:6], [0] * 6, seed=0)
    assert [g.ids for g in override] == [g.ids for g in at_half]
    assert [g.ids for g in override] != [g.ids for g in at_one]  # the override took effect
    greedy = engine(setup).generate(prefixes[:6], [0] * 6, seed=0, greedy=True)
    assert [g.ids for g in engine(setup).generate(prefixes[:6], [3] * 6, seed=5, temperature=0)] == [g.ids for g in greedy]


def test_batching_invariance(setup):
    _, _, prefixes = setup
    pre, sid = requests(prefixes[:8])

    def run(order, **kw):
        gens = engine(setup, **kw).generate([pre[i] for i in order], [sid[i] for i in order], seed=3,
                                            max_new_tokens=10)
        return {(tuple(pre[i]), sid[i]): g.ids for i, g in zip(order, gens)}

    fwd, rev = list(range(len(pre))), list(reversed(range(len(pre))))
    ref = run(fwd, batch_size=1, sort_by_length=False, dedup=False)  # every request alone: no padding at all
    assert len(ref) == 16
    for kw in [dict(batch_size=3), dict(batch_size=64), dict(batch_size=64, sort_by_length=False),
               dict(batch_size=4, sort_by_length=False, dedup=False)]:
        assert run(fwd, **kw) == ref, kw
        assert run(rev, **kw) == ref, kw


def test_left_padding_changes_logits_only_by_rounding(setup):
    """Why batching invariance holds: a left-padded row's logits equal the unpadded row's up to ~1e-7."""
    model, tok, prefixes = setup
    L = max(map(len, prefixes))
    ids = torch.full((len(prefixes), L), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prefixes):
        ids[r, L - len(p):], mask[r, L - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        diff = max((model(input_ids=torch.tensor([p])).logits[0, -1] - padded[r, -1]).abs().max().item()
                   for r, p in enumerate(prefixes))
    assert diff < 1e-5  # float reassociation only; measured ~2e-7 (a Gumbel argmax flips only on a ~1e-7 tie)


def test_dedup(setup):
    _, _, prefixes = setup
    pre, sid = requests(prefixes)
    eng = engine(setup)
    gens = eng.generate(pre, sid, seed=5)
    assert eng.stats.requests == 27 and eng.stats.generated == 24  # the 3 repeated requests were not regenerated
    assert [g.ids for g in gens[24:]] == [g.ids for g in gens[0:6:2]]
    assert eng.stats.generated_tokens == sum(len(g.ids) for g in gens[:24])
    gens[24].ids.append(-1)  # duplicates are separate objects
    assert gens[0].ids[-1] != -1
    plain = engine(setup, dedup=False)
    assert [g.ids for g in plain.generate(pre, sid, seed=5)] == [g.ids for g in engine(setup).generate(pre, sid, seed=5)]
    assert plain.stats.generated == 27


@pytest.mark.parametrize("i", [0, 5, 11])
def test_greedy_equals_hf_generate(setup, i):
    model, tok, prefixes = setup
    p = prefixes[i]
    with torch.no_grad():
        hf = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            do_sample=False, max_new_tokens=LIMIT, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
    ours = engine(setup).generate([p], [7], seed=0, greedy=True)[0]
    assert ours.ids == hf
    # Greedy inside a mixed-length batch is the same, and temperature 0 means greedy.
    batch = engine(setup, batch_size=64).generate(prefixes, [0] * len(prefixes), seed=0, greedy=True)
    assert batch[i].ids == hf
    assert engine(setup, temperature=0.0).generate([p], [3], seed=9)[0].ids == hf


def test_llama_batched_greedy_equals_hf_generate(setup):
    """The same left-padded, compacted batches work for a Llama (rotary positions) model."""
    _, tok, prefixes = setup
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(arch="llama", n_layer=2, n_embd=32, n_head=2, max_len=128), tok).eval()
    eng = HFRolloutEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, default_max_new_tokens=LIMIT)
    ours = eng.generate(prefixes[:6], [0] * 6, seed=0, greedy=True)
    with torch.no_grad():
        for p, g in zip(prefixes[:6], ours):
            hf = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                do_sample=False, max_new_tokens=LIMIT, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            assert g.ids == hf


def test_length_limit_and_eos(setup):
    _, tok, prefixes = setup
    eos = tok.eos_token_id
    gens = engine(setup).generate([prefixes[2]] * 40, list(range(40)), seed=0, max_new_tokens=10)
    stopped = [g for g in gens if g.finished]
    cut = [g for g in gens if not g.finished]
    assert stopped and cut  # a random model both stops early and runs into the limit here
    for g in stopped:
        assert g.ids[-1] == eos and g.ids.count(eos) == 1 and len(g.ids) <= 10
    for g in cut:
        assert len(g.ids) == 10 and eos not in g.ids


def test_generation_records_no_autograd_graph(setup):
    # with a graph, every decoding step's activations and KV writes stay alive: GBs over a run's evals
    model, _, prefixes = setup
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        engine(setup).generate(prefixes[:4], [0, 1, 2, 3], seed=0, max_new_tokens=4)
    finally:
        hook.remove()
    assert seen and not any(seen)


@pytest.mark.parametrize("kw", [{}, {"sync_every": 8, "compact_below": 0.5}, {"kv_cache": "static"}])
def test_a_prefix_near_the_context_end_stops_there_and_leaves_its_batch_unchanged(setup, kw):
    # 128 positions: the longest prefix here leaves fewer than max_new_tokens of them
    model, tok, prefixes = setup
    ctx = model.config.n_positions
    long = (prefixes[11] * 8)[: ctx - 5]  # 5 positions left
    pre = [prefixes[0], long, prefixes[3]]
    gens = engine(setup, **kw).generate(pre, [0, 0, 0], seed=1, max_new_tokens=40)  # an IndexError before
    assert len(gens[1].ids) <= 5 and (gens[1].finished or len(gens[1].ids) == 5)
    assert len(gens[1].logprobs) == len(gens[1].ids)
    alone = engine(setup, **kw).generate([prefixes[0], prefixes[3]], [0, 0], seed=1, max_new_tokens=40)
    assert [g.ids for g in alone] == [gens[0].ids, gens[2].ids]  # the other rows keep the call's limit
    assert max(len(gens[0].ids), len(gens[2].ids)) > 5
    with pytest.raises(ValueError, match=f"fills the model's context of {ctx} tokens"):
        engine(setup, **kw).generate([(prefixes[11] * 20)[:ctx]], [0], seed=1)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.5, "top_p": 0.8}])
def test_logprobs_are_the_models_teacher_forced_log_probs(setup, kw):
    """Each new token's log p under the untempered model, whatever the sampling temperature / top-p."""
    model, _, prefixes = setup
    gens = engine(setup, batch_size=5, **kw).generate(prefixes, list(range(len(prefixes))), seed=3)
    for p, g in zip(prefixes, gens):
        assert len(g.logprobs) == len(g.ids) > 0
        seq = torch.tensor([p + g.ids])
        with torch.no_grad():
            ref = model(seq).logits[0, len(p) - 1:-1].log_softmax(-1).gather(-1, seq[0, len(p):, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4), (g.logprobs, ref.tolist())
        assert all(lp <= 0 for lp in g.logprobs)


def test_bad_engine_config():
    for kw in [dict(batch_size=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
               dict(max_new_tokens=0), dict(backend="sglang")]:
        with pytest.raises(ConfigError, match="bad config engine"):
            EngineConfig(**kw)

