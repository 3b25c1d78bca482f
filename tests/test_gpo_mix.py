"""How a GPO round mixes its data (gpo.mix), reuses the estimator's draws (gpo.reuse=tree) and keeps
to a token budget (gpo.max_token_ratio), on a scripted policy with known prefix success rates.

Round used throughout (reuse_siblings off, so every draw is generated):
  prompt A: uid 0 succeeds (3 steps), uid 1 fails (3 steps)
  prompt B: uid 2 fails, uid 3 fails (3 steps each)
Each step is 2 tokens; a scripted continuation of prefix i has (3 - i) * 3 tokens (tests/test_estimators.py).
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from gpo_exp.registry import ConfigError
from gpo_exp.rollout.estimators import ESTIMATORS, EstimatorConfig, MCEstimator
from gpo_exp.rollout.gpo_round import GPOConfig, check_gpo, collect_round, localisation_order
from gpo_exp.rollout.types import Trajectory
from gpo_exp.training.examples import round_examples
from gpo_exp.training.objectives import OPTIMIZERS
from tests.test_estimators import L, ScriptedSampler

N = 3
# V of prefixes 0..2 per uid: uid 1 drops to 0 after step 1 (critical 1), uids 2 and 3 after step 0 (critical 0)
P = {0: [1.0, 1.0, 1.0], 1: [1.0, 1.0, 0.0], 2: [1.0, 0.0, 0.0], 3: [1.0, 0.0, 0.0]}


def make_trajs() -> list[Trajectory]:
    out = []
    for uid, (prompt, reward) in enumerate([(7, 1.0), (7, 0.0), (8, 0.0), (8, 0.0)]):
        out.append(Trajectory(prompt_ids=[prompt], completion_ids=[100 * (uid + 1) + i for i in range(2 * N)],
                              reward=reward, step_ends=[2, 4, 6], uid=uid, first_error=None))
    return out


class RoundSampler:
    """The PolicySampler surface collect_round uses, over ScriptedSampler, counting generated tokens."""

    def __init__(self) -> None:
        self.scripted = ScriptedSampler(P)
        self.engine = SimpleNamespace(stats=SimpleNamespace(generated_tokens=0))
        self.benchmark = self.tokenizer = None

    def trajectories(self, rows, n, uid_start=0):
        trajs = make_trajs()
        self.engine.stats.generated_tokens += sum(len(t.completion_ids) for t in trajs)
        return trajs

    def __call__(self, jobs, temperature=None):
        out = self.scripted(jobs, temperature)
        self.engine.stats.generated_tokens += sum(len(c.ids) for cs in out for c in cs)
        return out


def mc() -> MCEstimator:
    return MCEstimator(EstimatorConfig(name="mc", k=2, reuse_siblings=False))


def run(**kw):
    cfg = GPOConfig(**{"reset_samples": 2, "max_token_ratio": None, **kw})
    return collect_round([{}], RoundSampler(), mc(), cfg, seed=0), cfg


def test_augment_keeps_the_fresh_groups_and_adds_reset_groups():
    data, _ = run(mix="augment")
    fresh = [g for g in data.groups if g.source == "fresh"]
    reset = [g for g in data.groups if g.source == "reset"]
    assert [len(g.continuations) for g in fresh] == [2, 2]  # both prompts, all four trajectories
    assert sorted((g.uid, g.step) for g in reset) == [(1, 1), (2, 0), (3, 0)]
    # 2 fresh draws + K=2 reused + the original continuation; the prefix is the steps before the critical one
    assert [len(g.continuations) for g in reset] == [5, 5, 5]
    assert {g.uid: len(g.prefix_ids) for g in reset} == {1: 2, 2: 0, 3: 0}


def test_replace_trains_on_reset_groups_only():
    data, _ = run(mix="replace")
    assert [g.source for g in data.groups] == ["reset"] * 3


def test_substitute_replaces_each_failed_trajectory_by_its_reset_continuation():
    data, _ = run(mix="substitute")
    assert [g.source for g in data.groups] == ["fresh", "fresh"]
    a, b = data.groups
    # uid 0 (success) kept; uid 1 -> its first 2 tokens (prefix before step 1) + one draw from there (V=1)
    assert a.continuations[0].ids == [100, 101, 102, 103, 104, 105] and a.continuations[0].frozen == 0
    sub = a.continuations[1]
    assert sub.ids[:2] == [200, 201] and sub.frozen == 2 and len(sub.ids) == 2 + 2 * L and sub.reward == 1.0
    # uids 2 and 3 reset to the prompt (critical 0): nothing frozen, one draw each (V=1)
    assert [(c.frozen, c.reward, len(c.ids)) for c in b.continuations] == [(0, 1.0, 3 * L), (0, 1.0, 3 * L)]
    # one draw per reset prefix: 3 reset prefixes, 3 * 2 * L... tokens: uid 1 at prefix 1 (6), uids 2/3 at 0 (9 each)
    assert data.stats["gpo/reset_groups"] == 3 and data.stats["gpo/reset_tokens"] == 2 * L + 2 * 3 * L


@pytest.mark.parametrize("name", ["grpo", "dpo"])
def test_substituted_rollouts_train_only_after_the_shared_prefix(name):
    data, cfg = run(mix="substitute")
    obj = OPTIMIZERS.build({"name": name})
    ex, counts = round_examples(obj, data.groups, cfg, random.Random(0))
    assert counts == {"gpo/examples_fresh": len(ex), "gpo/examples_reset": 0, "gpo/examples_tree": 0}
    if name == "grpo":
        # group A: uid 0 (reward 1, start 1 = after the prompt) and uid 1's substitute (reward 1): equal rewards,
        # no signal; group B: both substitutes succeed: skipped too
        assert ex == []
        data.groups[0].continuations[1].reward = 0.0  # make group A informative
        ex, _ = round_examples(obj, data.groups, cfg, random.Random(0))
        assert [(e["start"], e["reward"]) for e in ex] == [(1, 1.0), (1 + 2, 0.0)]
    else:
        data.groups[0].continuations[1].reward = 0.0
        ex, _ = round_examples(obj, data.groups, cfg, random.Random(0))
        assert [(e["start"], e["rejected_start"]) for e in ex] == [(1, 3)]


def test_round_examples_caps_each_source_and_keeps_rollout_groups_distinct():
    data, _ = run(mix="augment", examples_per_round=1, reset_examples=2)
    data.groups[0].continuations[0].reward = 1.0  # prompt A: uid 0 succeeds, uid 1 fails -> informative
    cfg = GPOConfig(examples_per_round=1, reset_examples=2)
    obj = OPTIMIZERS.build({"name": "grpo", "rollouts_per_example": 5})
    ex, counts = round_examples(obj, data.groups, cfg, random.Random(0))
    # fresh (cap 1 x 5 rollouts): prompt A's 2 (prompt B's fail alike: no signal). reset (cap 2 x 5): each
    # group is 2 draws + 2 reused + the failed original = 5, all informative; only two whole groups fit
    assert counts["gpo/examples_fresh"] == 2 and counts["gpo/examples_reset"] == 10
    assert len({e["group"] for e in ex}) == 3
    assert [e["source"] for e in ex] == ["fresh"] * 2 + ["reset"] * 10


def test_loss_mask_continuation_skips_a_reset_groups_prefix():
    data, cfg = run(mix="replace")
    obj = OPTIMIZERS.build({"name": "grpo"})
    ex, _ = round_examples(obj, data.groups, cfg, random.Random(0))
    by_uid = {e["uid"]: e["start"] for e in ex}
    assert by_uid == {1: 1 + 2, 2: 1, 3: 1}  # prompt 1 token; uid 1's prefix (2 tokens) is not trained
    obj = OPTIMIZERS.build({"name": "grpo", "loss_mask": "completion"})
    ex, _ = round_examples(obj, data.groups, cfg, random.Random(0))
    assert {e["uid"]: e["start"] for e in ex} == {1: 1, 2: 1, 3: 1}


def test_tree_turns_draws_at_other_prefixes_with_mixed_outcomes_into_groups():
    data, _ = run(mix="augment", reuse="tree")
    tree = sorted((g.uid, g.step, len(g.continuations)) for g in data.groups if g.source == "tree")
    # uid 1: prefix 0 (V=1 draws, own continuation fails) and prefix 2 (V=0 draws, fails: one outcome, left out);
    # prefix 1 is the critical one (already the reset group). uids 2/3: prefixes 1, 2 are dead like the
    # trajectory: one outcome, left out.
    assert tree == [(1, 0, 3)]
    assert data.stats["gpo/tree_groups"] == 1
    capped, _ = run(mix="augment", reuse="tree", tree_group_size=2)
    assert [len(g.continuations) for g in capped.groups if g.source == "tree"] == [2]


def test_tree_with_substitute_includes_the_critical_prefix_and_caps_prefixes_per_trajectory():
    data, _ = run(mix="substitute", reuse="tree")
    tree = sorted((g.uid, g.step) for g in data.groups if g.source == "tree")
    # the critical prefix's draws are in no reset group under substitute: uid 1's prefixes 0 and 1, uid 2's 0;
    # uid 3's prompt group would repeat uid 2's (same prefix, the same scripted draws): left out
    assert tree == [(1, 0), (1, 1), (2, 0)]
    one, _ = run(mix="substitute", reuse="tree", tree_prefixes=1)
    assert sorted(g.uid for g in one.groups if g.source == "tree") == [1, 2]


def test_token_budget_localises_in_a_seeded_one_per_prompt_order():
    trajs = make_trajs()
    order = localisation_order(trajs, "failed", seed=0)
    assert sorted(order) == [1, 2, 3]
    assert order[2] in (2, 3) and {order[0], order[1]} & {1} == {1}  # one per prompt first: prompt A's only failure
    assert order == localisation_order(trajs, "failed", seed=0)  # seeded


def test_token_budget_stops_localising_when_spent(monkeypatch):
    import gpo_exp.rollout.gpo_round as gr
    monkeypatch.setattr(gr, "FIRST_CHUNK", 1)
    full, _ = run(mix="augment")
    fresh = full.stats["rollout/trajectory_tokens"]
    assert fresh == 24
    # mc K=2 on a 3-step failed trajectory: 2 * (9 + 6 + 3) = 36 tokens; reset 2 draws at prefix 0 = 18, at 1 = 12
    assert full.stats["gpo/estimation_tokens"] == 3 * 36 and full.stats["rollout/round_generated_tokens"] == 24 + 108 + 12 + 36
    budgeted, _ = run(mix="augment", max_token_ratio=4.0)  # budget 3 * 24 = 72 extra tokens
    st = budgeted.stats
    assert st["gpo/explored"] == 1 and st["gpo/unlocalised_failed"] == 2  # the first costs ~48-54, a second would not fit
    assert st["rollout/round_generated_tokens"] - fresh <= 72
    assert [g.source for g in budgeted.groups].count("reset") == 1


def test_bad_mix_reuse_and_tree_without_rollouts_are_one_line():
    for kw, key in (({"mix": "both"}, "gpo.mix"), ({"reuse": "forest"}, "gpo.reuse"),
                    ({"max_token_ratio": 1.0}, "gpo.max_token_ratio"), ({"tree_group_size": 1}, "gpo.tree_group_size")):
        with pytest.raises(ConfigError) as e:
            GPOConfig(**kw)
        assert key in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="augment | replace | substitute"):
        GPOConfig(mix="both")
    for name in ("random", "confidence"):
        with pytest.raises(ConfigError) as e:
            check_gpo(GPOConfig(reuse="tree"), ESTIMATORS.build({"name": name}))
        assert f"estimator={name}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="estimator.temperature"):
        check_gpo(GPOConfig(reuse="tree"), ESTIMATORS.build({"name": "mc", "temperature": 0.5}))
    check_gpo(GPOConfig(reuse="tree"), ESTIMATORS.build({"name": "adaptive"}))  # draws rollouts: fine
    check_gpo(GPOConfig(reuse="critical"), ESTIMATORS.build({"name": "random"}))
