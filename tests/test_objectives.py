"""Base optimizers end to end on hand-made groups and a tiny random GPT-2 (char tokenizer).

Groups (0/1 rewards), shared by every test:
  g0  prompt "1+2=" prefix "a\\n"  continuations "3\\n"(1) "4\\n"(0) "56\\n"(0) "3"(1)   -> rewards [1,0,0,1]
  g1  prompt "2+2=" prefix ""     continuations "4"(1) "4\\n"(1) "44"(1)             -> all equal: no signal
  g2  prompt "9+1=" prefix "b"    continuations "10"(0) "1"(1)                       -> rewards [0,1]
Golden numbers use that the reference starts as an exact copy of the policy (all log-ratios 0).
"""
from __future__ import annotations

import copy
import math
import random

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gpo_exp.losses import grpo_advantages
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.tiny import char_tokenizer, tiny_model
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.types import Continuation, Group
from gpo_exp.training.batching import pad_sequences, sequence_logps
from gpo_exp.training.objectives import OPTIMIZERS
from gpo_exp.training.objectives.kto import kl_sequences

TOK = char_tokenizer(["0123456789+=ab\n"])
PAD = TOK.pad_token_id
CONF = Path(__file__).resolve().parents[1] / "conf" / "optimizer"
ALL = ("dpo", "ipo", "simpo", "orpo", "kto", "ppo", "grpo")


def enc(s: str) -> list[int]:
    return TOK(s, add_special_tokens=False)["input_ids"]


def group(uid: int, prompt: str, prefix: str, conts: list[tuple[str, float]]) -> Group:
    return Group(prompt_ids=enc(prompt), prefix_ids=enc(prefix), uid=uid, step=len(prefix),
                 continuations=[Continuation(ids=enc(t), reward=r) for t, r in conts])


G0 = group(0, "1+2=", "a\n", [("3\n", 1), ("4\n", 0), ("56\n", 0), ("3", 1)])
G1 = group(1, "2+2=", "", [("4", 1), ("4\n", 1), ("44", 1)])
G2 = group(2, "9+1=", "b", [("10", 0), ("1", 1)])
GROUPS = [G0, G1, G2]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, max_len=64), TOK)


@pytest.fixture
def models(base):
    """(policy, frozen reference), the reference an exact copy of the policy."""
    policy = copy.deepcopy(base)
    ref = copy.deepcopy(base).requires_grad_(False).eval()
    return policy, ref


def build(name: str, **kw):
    """The optimizer as conf/optimizer/<name>.yaml configures it, with overrides `kw`."""
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    return OPTIMIZERS.build({**yaml, **kw})


def prepare(obj, policy, ref, groups=GROUPS, limit=8, pairs_per_group=1):
    """make_examples + precompute as rounds.py does; the value head first, as run.py does."""
    head = obj.make_value_head(policy) if obj.uses_value_head else None
    examples = obj.make_examples(groups, limit, random.Random(0), pairs_per_group)
    obj.precompute(examples, policy, ref if obj.uses_reference else None, PAD)
    return examples, head


def unique(examples):
    seen, out = set(), []
    for e in examples:
        if id(e) not in seen:
            seen.add(id(e))
            out.append(e)
    return out


def span_of(e) -> int:
    return len(e["ids"]) - e["start"]


# ----------------------------------------------------------------------------- examples


def test_make_examples_counts_and_kinds(models):
    policy, ref = models
    dpo = build("dpo").make_examples(GROUPS, 8, random.Random(0), 1)
    assert len(dpo) == 2 and sorted(e["uid"] for e in dpo) == [0, 2]  # g1 has no incorrect continuation
    g2 = next(e for e in dpo if e["uid"] == 2)
    assert g2["chosen"] == enc("9+1=b1") and g2["rejected"] == enc("9+1=b10")

    kto = build("kto").make_examples(GROUPS, 8, random.Random(0), 1)
    assert len(kto) == 4 and [e["desirable"] for e in kto] == [True, False, True, False]
    assert build("kto").make_examples(GROUPS, 1, random.Random(0), 1).__len__() == 2  # 1 pair -> 2 examples

    ppo = build("ppo").make_examples(GROUPS, 8, random.Random(0), 1)
    assert len(ppo) == 9 and sorted(e["reward"] for e in ppo) == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    uids = [e["uid"] for e in ppo]
    assert all(uids.count(u) == len(GROUPS[u].continuations) for u in (0, 1, 2))
    assert sum(a != b for a, b in zip(uids, uids[1:])) == 2  # each group's rollouts are contiguous

    grpo = build("grpo")
    ex = grpo.make_examples(GROUPS, 8, random.Random(0), 1)
    assert len(ex) == 6 and sorted(e["uid"] for e in ex) == [0, 0, 0, 0, 2, 2]
    assert (grpo.skipped_groups, grpo.seen_groups) == (1, 3)


def test_rollout_cap_takes_whole_groups():
    # cap = limit * rollouts_per_example; only g2 (2 rollouts) fits in 2 (ppo) or 3 (grpo) in any order
    ppo = build("ppo", rollouts_per_example=2).make_examples(GROUPS, 1, random.Random(0), 1)
    assert [e["uid"] for e in ppo] == [2, 2]
    grpo = build("grpo", rollouts_per_example=3).make_examples(GROUPS, 1, random.Random(0), 1)
    assert [e["uid"] for e in grpo] == [2, 2]


def test_grpo_advantages_and_skips():
    grpo = build("grpo")
    ex = grpo.make_examples(GROUPS, 8, random.Random(0), 1)
    got = {(e["uid"], tuple(e["ids"])): e["advantage"] for e in ex}
    a4 = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # [1,0,0,1]: mean 0.5, unbiased std sqrt(1/3)
    a2 = 0.5 / (math.sqrt(0.5) + 1e-4)  # [0,1]: mean 0.5, unbiased std sqrt(1/2)
    expect = {(0, tuple(enc("1+2=a\n3\n"))): a4, (0, tuple(enc("1+2=a\n4\n"))): -a4,
              (0, tuple(enc("1+2=a\n56\n"))): -a4, (0, tuple(enc("1+2=a\n3"))): a4,
              (2, tuple(enc("9+1=b10"))): -a2, (2, tuple(enc("9+1=b1"))): a2}
    assert got.keys() == expect.keys()
    for k in expect:
        assert got[k] == pytest.approx(expect[k], abs=1e-6)
    g0 = [e["advantage"] for e in ex if e["uid"] == 0]
    assert g0 == pytest.approx(grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4).tolist(), abs=1e-6)

    # a round where every group is all-equal: no examples, every group counted, no NaN anywhere
    flat = [G1, group(3, "1+1=", "", [("2", 0), ("3", 0)])]
    assert grpo.make_examples(flat, 8, random.Random(0), 1) == []
    assert (grpo.skipped_groups, grpo.seen_groups) == (3, 5)
    # group_size subsamples a group (any 3 of [1,0,0,1] carry signal); a group of one is skipped
    sub = build("grpo", group_size=3)
    lone = group(4, "1+1=", "", [("2", 1)])
    ex = sub.make_examples([G0, lone], 8, random.Random(1), 1)
    assert len(ex) == 3 and {e["uid"] for e in ex} == {0} and len({tuple(e["ids"]) for e in ex}) == 3
    assert (sub.skipped_groups, sub.seen_groups) == (1, 2)
    assert sum(e["advantage"] for e in ex) == pytest.approx(0.0, abs=1e-6)


def test_kl_sequences_rotate_completions():
    # context i + completion (i-1) % B, cut to the longest input
    assert kl_sequences([[1, 2, 3], [4, 5, 6, 7]], [1, 2]) == [[1, 6, 7], [4, 5, 2, 3]]
    assert kl_sequences([[1, 2], [3, 4, 5, 6, 7]], [1, 1]) == [[1, 4, 5, 6, 7], [3, 2]]


# ----------------------------------------------------------------------------- precompute


def test_precompute_fields(models):
    policy, ref = models
    ex, _ = prepare(build("dpo"), policy, ref)
    for e in ex:  # reference log-probs of (chosen, rejected), as sequence_logps computes them
        b = pad_sequences([e["chosen"], e["rejected"]], [e["start"]] * 2, PAD)
        assert e["ref_logps"] == pytest.approx(sequence_logps(ref, b)[0].tolist(), abs=1e-5)
    assert all("ref_logps" not in e for e in prepare(build("simpo"), policy, ref)[0])
    assert all("ref_logps" not in e for e in prepare(build("dpo", precompute_ref=False), policy, ref)[0])

    ex, _ = prepare(build("kto"), policy, ref)
    for e in ex:
        b = pad_sequences([e["ids"]], [e["start"]], PAD)
        assert e["ref_logps"] == pytest.approx(sequence_logps(ref, b)[0].item(), abs=1e-5)

    grpo = build("grpo")
    ex, _ = prepare(grpo, policy, ref)
    assert not grpo.uses_reference and all("ref_logps" not in e for e in ex)
    for e in ex:
        b = pad_sequences([e["ids"]], [e["start"]], PAD)
        assert len(e["old_logps"]) == span_of(e)
        assert sum(e["old_logps"]) == pytest.approx(sequence_logps(policy, b)[0].item(), abs=1e-5)
    grpo_kl = build("grpo", beta=0.1)
    ex, _ = prepare(grpo_kl, policy, ref)
    assert grpo_kl.uses_reference and all(e["ref_logps"] == pytest.approx(e["old_logps"], abs=1e-6) for e in ex)


def test_ppo_precompute_golden(models):
    """Reference == policy (KL 0) and a zero value head: returns_t = lam^(L-1-t) * reward, values 0."""
    policy, ref = models
    ppo = build("ppo", whiten_advantages=False)
    head = ppo.make_value_head(policy)
    assert head.bias.item() == 0.0 and head.weight.shape == (1, 32)
    with torch.no_grad():
        head.weight.zero_()
    ex = ppo.make_examples(GROUPS, 8, random.Random(0), 1)
    ppo.precompute(ex, policy, ref, PAD)
    assert len(ex) == 9 and ppo.passes == 2  # ppo_epochs = 2: the DataModule serves the buffer twice
    for e in ex[:9]:
        L = span_of(e)
        golden = [0.95 ** (L - 1 - t) * e["reward"] for t in range(L)]
        assert all(len(e[k]) == L for k in ("old_logps", "ref_logps", "old_values", "advantages", "returns"))
        assert e["old_values"] == [0.0] * L
        assert e["returns"] == pytest.approx(golden, abs=1e-6)
        assert e["advantages"] == pytest.approx(golden, abs=1e-6)

    # loss at the start on the whole buffer: ratio 1, values 0 (clip inactive), so
    # pg = -mean(A) over tokens and vf = 0.5 * mean(R^2)
    loss, m = ppo.loss(policy, ppo.collate(ex[:9], PAD), ref, head)
    R = [r for e in ex[:9] for r in e["returns"]]
    vf = 0.5 * sum(r * r for r in R) / len(R)
    assert m["loss/value"] == pytest.approx(vf, abs=1e-6)
    assert m["loss/policy"] == pytest.approx(-sum(R) / len(R), abs=1e-6)  # A == R here
    assert loss.item() == pytest.approx(m["loss/policy"] + 0.1 * vf, abs=1e-6)
    assert m["objective/kl"] == 0.0 and m["policy/clipfrac"] == 0.0 and m["policy/approxkl"] == 0.0
    assert m["objective/scores"] == pytest.approx(6 / 9)

    # whitened over the round's buffer: token mean 0, unbiased variance 1
    ex, _ = prepare(build("ppo"), policy, ref)
    adv = torch.tensor([a for e in ex[:9] for a in e["advantages"]])
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert adv.var().item() == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- one optimizer step


GOLDEN_START = {"dpo": math.log(2), "ipo": 25.0, "kto": 0.5}  # every log-ratio is 0 at the start


@pytest.mark.parametrize("name", ALL)
def test_one_step_trains_policy_not_reference(models, name):
    policy, ref = models
    obj = build(name)
    ex, head = prepare(obj, policy, ref)
    batch = obj.collate(unique(ex), PAD)
    params = list(policy.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    ref_before = [p.detach().clone() for p in ref.parameters()]

    loss, metrics = obj.loss(policy, batch, ref if obj.uses_reference else None, head)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    if name in GOLDEN_START:
        assert loss.item() == pytest.approx(GOLDEN_START[name], abs=1e-5)
    if name == "grpo":  # ratio 1: loss = -sum_i A_i n_i / sum_i n_i over the batch tokens
        u = unique(ex)
        expect = -sum(e["advantage"] * span_of(e) for e in u) / sum(span_of(e) for e in u)
        assert loss.item() == pytest.approx(expect, abs=1e-5)
        assert metrics["skipped_groups"] == 1.0
    opt.zero_grad()
    loss.backward()
    opt.step()

    changed = [not torch.equal(a, p.detach()) for a, p in zip(before, params)]
    assert sum(changed) > len(params) // 2
    if head is not None:  # the value head trains too
        assert not torch.equal(before[-2], head.weight.detach())
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    assert all(torch.equal(a, p) for a, p in zip(ref_before, ref.parameters()))


@pytest.mark.parametrize("name,kw", [("dpo", {}), ("kto", {}), ("grpo", {"beta": 0.1})])
def test_precompute_ref_false_gives_same_loss(models, name, kw):
    policy, ref = models
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = []
    for pre in (True, False):
        obj = build(name, precompute_ref=pre, **kw)
        ex, _ = prepare(obj, policy, ref)
        batch = obj.collate(unique(ex), PAD)
        assert ("ref_logps" in batch) == pre
        out.append(obj.loss(policy, batch, ref, None)[0].item())
    assert out[0] == pytest.approx(out[1], abs=1e-6)
    if name in GOLDEN_START:
        assert abs(out[0] - GOLDEN_START[name]) > 1e-4


def test_kto_one_sided_and_single_batches(models):
    policy, ref = models
    kto = build("kto")
    ex, _ = prepare(kto, policy, ref)
    loss, m = kto.loss(policy, kto.collate([e for e in ex if e["desirable"]], PAD), ref)
    assert set(m) == {"kl", "rewards/chosen", "logps/chosen"} and loss.item() == pytest.approx(0.5, abs=1e-6)
    loss, m = kto.loss(policy, kto.collate([e for e in ex if not e["desirable"]], PAD), ref)
    assert set(m) == {"kl", "rewards/rejected", "logps/rejected"} and loss.item() == pytest.approx(0.5, abs=1e-6)
    batch = kto.collate(ex[:1], PAD)  # a batch of one: no mismatched pair, z0 = 0
    assert "kl_input_ids" not in batch
    loss, m = kto.loss(policy, batch, ref)
    assert m["kl"] == 0.0 and loss.item() == pytest.approx(0.5, abs=1e-6)
    full = kto.loss(policy, kto.collate(ex, PAD), ref)[1]
    assert set(full) == {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                         "logps/chosen", "logps/rejected"}


# ----------------------------------------------------------------------------- loss mask


@pytest.mark.parametrize("name", ("dpo", "kto", "ppo", "grpo"))
def test_continuation_mask_drops_exactly_the_prefix(models, name):
    """g2: prompt "9+1=" (4 tokens), prefix "b" (1), continuations "10" and "1"."""
    policy, ref = models
    sums = {}
    for mask in ("completion", "continuation"):
        obj = build(name, loss_mask=mask)
        ex, _ = prepare(obj, policy, ref, groups=[G2])
        batch = obj.collate(unique(ex), PAD)
        rows = [e["ids"] if "ids" in e else e["chosen"] for e in unique(ex)]
        if name == "dpo":
            rows = [ex[0]["chosen"], ex[0]["rejected"]]
        sums[mask] = {tuple(r): s for r, s in zip(rows, batch["loss_mask"].sum(-1).tolist())}
        # every prompt (and, for continuation, prefix) position is masked out
        starts = 5 if mask == "continuation" else 4
        assert batch["loss_mask"][:, :starts].sum().item() == 0.0
    expect_cont = {tuple(enc("9+1=b10")): 2.0, tuple(enc("9+1=b1")): 1.0}
    assert sums["continuation"] == expect_cont
    assert sums["completion"] == {k: v + 1.0 for k, v in expect_cont.items()}


# ----------------------------------------------------------------------------- bad config


@pytest.mark.parametrize("cfg,key", [
    ({"name": "dpo", "loss_type": "nope"}, "loss_type"),
    ({"name": "dpo", "beta": 0.0}, "beta"),
    ({"name": "kto", "beta": -1.0}, "beta"),
    ({"name": "kto", "batch_size": 1}, "batch_size"),
    ({"name": "grpo", "group_size": 1}, "group_size"),
    ({"name": "grpo", "min_group_size": 1}, "min_group_size"),
    ({"name": "ppo", "precompute_ref": False}, "precompute_ref"),
    ({"name": "ppo", "epochs_per_round": 2}, "epochs_per_round"),
    ({"name": "ppo", "lam": 1.5}, "lam"),
])
def test_bad_config_one_line(cfg, key):
    with pytest.raises(ConfigError) as e:
        OPTIMIZERS.config(cfg)
    msg = str(e.value)
    assert f"optimizer.{key}" in msg and "\n" not in msg


def test_score_sequences_matches_per_sequence_logps_and_scores_duplicates_once(models):
    from gpo_exp.training.batching import score_sequences

    _, ref = models
    seqs = [enc("1+2=a\n3\n"), enc("9+1=b10"), enc("1+2=a\n3\n"), enc("2+2=4"), enc("1+2=a\n3\n")]
    starts = [4, 4, 4, 4, 2]  # the last repeats a sequence with another start: a different score
    calls = []
    hook = ref.get_decoder().register_forward_hook(lambda m, i, o: calls.append(1))  # one decoder pass per batch
    try:
        got = score_sequences(ref, seqs, starts, PAD, batch_size=2)
    finally:
        hook.remove()
    want = [sequence_logps(ref, pad_sequences([s], [st], PAD))[0].item() for s, st in zip(seqs, starts)]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] == got[2] and got[4] != got[0]
    assert len(calls) == 2  # 4 distinct (sequence, start) keys in batches of 2


def test_pad_sequences_ends_cut_the_loss_mask():
    b = pad_sequences([enc("1+2=3\n"), enc("9+1=10")], [4, 4], PAD, ends=[5, None])
    assert b["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo"])
def test_pair_ends_mask_both_sides_and_precompute_agrees(models, name):
    """chosen_end / rejected_end narrow a pair's loss; the reference pass scores the same tokens."""
    from gpo_exp.training.batching import score_sequences

    policy, ref = models
    obj = build(name, loss_mask="completion")  # the prefix "b" is trained too
    examples = obj.make_examples([G2], 8, random.Random(0), 1)  # chosen "9+1=b1", rejected "9+1=b10"
    for e in examples:
        e["chosen_end"], e["rejected_end"] = len(e["chosen"]), len(e["rejected"]) - 1  # drop rejected's "0"
    batch = obj.collate(examples, PAD)
    assert batch["loss_mask"].sum(-1).tolist() == [2, 2]  # "b1" and "b1": the pair's scored spans
    if obj.uses_reference:
        obj.precompute(examples, policy, ref, PAD)
        got = examples[0]["ref_logps"]
        want = score_sequences(ref, [enc("9+1=b1")] * 2, [4, 4], PAD)
        assert got == pytest.approx(tuple(want), abs=1e-6)
    loss, _ = obj.loss(policy, obj.collate(examples, PAD), ref)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("micro", [1, 2])
def test_micro_batches_accumulate_the_full_batch_gradient(models, name, micro):
    """sum_i w_i * grad loss(micro_i) equals grad loss(full batch) to 1e-5 for every objective,
    including KTO's batch KL point and the token means of PPO and GRPO."""
    policy, ref = models
    obj = build(name, batch_size=4, micro_batch_size=micro)
    ex, head = prepare(obj, policy, ref, limit=8, pairs_per_group=4)
    ex = unique(ex)[:4]
    assert len(ex) == 4
    r = ref if obj.uses_reference else None
    params = list(policy.parameters()) + (list(head.parameters()) if head is not None else [])

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g if g is not None else torch.zeros_like(p)
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    full_loss = obj.loss(policy, obj.collate(ex, PAD), r, head)[0]
    full = grads(full_loss)
    step = obj.collate_step(ex, PAD)
    assert len(step["micro"]) == 4 // micro and sum(step["weights"]) == pytest.approx(1.0)
    ctx = obj.step_context(policy, r, step)
    acc = [torch.zeros_like(p) for p in params]
    total = 0.0
    for part, w in zip(step["micro"], step["weights"]):
        loss = obj.loss(policy, part, r, head, ctx)[0] * w
        total += loss.item()
        acc = [a + g for a, g in zip(acc, grads(loss))]
    assert total == pytest.approx(full_loss.item(), abs=1e-6)
    assert max((a - f).abs().max().item() for a, f in zip(acc, full)) < 1e-5
    assert max(f.abs().max().item() for f in full) > 1e-4  # the gradient compared is not trivially zero


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"optimizer.micro_batch_size=3: must be null or a divisor of optimizer.batch_size=16"):
        OPTIMIZERS.config({"name": "dpo", "micro_batch_size": 3})
