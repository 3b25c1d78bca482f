"""Critical-step estimators against a scripted policy whose prefix success probabilities are known."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from omegaconf import OmegaConf

from gpo_exp.registry import ConfigError
from gpo_exp.rollout.estimators import (
    ESTIMATORS, AdaptiveConfig, AdaptiveEstimator, BisectEstimator, ConfidenceEstimator, EstimatorConfig,
    MCEstimator, RandomEstimator, agreement, critical_step_hist, status_counts,
)
from gpo_exp.rollout.types import Continuation, Job, Trajectory

L = 3  # tokens per remaining step in a scripted continuation
CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"


class ScriptedSampler:
    """Prefix (uid, step) succeeds with probability p[uid][step]; sample j is a fixed hash-seeded coin.

    exact=True returns reward = p itself (a partial-credit grader), so values are exact fractions.
    Counts sampler calls and jobs, and every (uid, step, j) asked for.
    """

    def __init__(self, p: dict[int, Sequence[float]], exact: bool = False) -> None:
        self.p, self.exact = p, exact
        self.calls, self.jobs = 0, 0
        self.asked: list[tuple[int, int, int]] = []
        self.temperatures: list[float | None] = []  # the temperature each call asked for

    def coin(self, uid: int, step: int, j: int) -> float:
        h = hashlib.blake2b(f"{uid}/{step}/{j}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64

    def __call__(self, jobs: Sequence[Job], temperature: float | None = None) -> list[list[Continuation]]:
        self.calls += 1
        self.temperatures.append(temperature)
        self.jobs += len(jobs)
        out = []
        for job in jobs:
            t, p = job.traj, self.p[job.traj.uid][job.step]
            conts = []
            for j in range(job.offset, job.offset + job.n):
                self.asked.append((t.uid, job.step, j))
                reward = p if self.exact else float(self.coin(t.uid, job.step, j) < p)
                conts.append(Continuation(ids=[job.step] * ((t.n_steps - job.step) * L), reward=reward))
            out.append(conts)
        return out


def traj(uid: int, n: int, reward: float = 0.0, first_error: int | None = None,
         conf: Sequence[float] | None = None) -> Trajectory:
    """A trajectory of n steps of 2 tokens each, with a prompt of its own (no siblings).
    conf: each step's least likely token log-prob (its other token gets -0.01); None: no log-probs."""
    lps = None if conf is None else [x for c in conf for x in (-0.01, c)]
    return Trajectory(prompt_ids=[1000 + uid], completion_ids=list(range(2 * n)), reward=reward,
                      step_ends=[2 * (i + 1) for i in range(n)], uid=uid, first_error=first_error,
                      token_logprobs=lps)


def mc(**kw) -> MCEstimator:
    return MCEstimator(EstimatorConfig(name="mc", **kw))


def bisect(**kw) -> BisectEstimator:
    return BisectEstimator(EstimatorConfig(name="bisect", **kw))


def adaptive(**kw) -> AdaptiveEstimator:
    """Plain calibrated bisection (prior=none): the scripted trajectories carry no token log-probs."""
    return AdaptiveEstimator(AdaptiveConfig(**{"prior": "none", **kw}))


def guided(**kw) -> AdaptiveEstimator:
    return AdaptiveEstimator(AdaptiveConfig(**kw))  # the default: prior=confidence


def mc_tokens(n: int, k: int) -> int:
    """Tokens of mc on one n-step trajectory: K continuations of (n - i) * L tokens from every prefix i < n."""
    return k * L * sum(n - i for i in range(n))


# --- the paper's definition ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [mc, bisect, adaptive])
def test_failed_trajectory_whose_value_drops_at_step_2_has_critical_step_2(make):
    # prefixes 0..2 always succeed, prefixes 3, 4 never; the trajectory itself (prefix 5) failed.
    sampler = ScriptedSampler({7: [1, 1, 1, 0, 0]})
    (loc,) = make().locate([traj(7, 5, first_error=2)], sampler, seed=0)
    assert (loc.critical, loc.status, loc.reset_step) == (2, "located", 2)
    assert loc.values[2] == 1.0 and loc.values[3] == 0.0 and loc.values[5] == 0.0
    assert loc.advantages[2] == -1.0
    assert loc.rollouts == sum(len(v) for v in loc.samples.values())
    assert loc.tokens == sum(len(c.ids) for v in loc.samples.values() for c in v)


def test_mc_spends_n_times_k_rollouts_in_one_call_and_skips_successes():
    p = {0: [1, 1, 0, 0], 1: [1, 1, 1, 1, 1, 1], 2: [1, 0, 0]}
    trajs = [traj(0, 4), traj(1, 6, reward=1.0), traj(2, 3)]
    sampler = ScriptedSampler(p)
    locs = mc(k=4).locate(trajs, sampler, seed=0)
    assert sampler.calls == 1 and sampler.jobs == 4 + 3  # one job per prefix of each failed trajectory
    assert [loc.rollouts for loc in locs] == [16, 0, 12]
    assert [loc.tokens for loc in locs] == [mc_tokens(4, 4), 0, mc_tokens(3, 4)] == [120, 0, 72]
    assert [loc.critical for loc in locs] == [1, None, 0]
    assert [loc.status for loc in locs] == ["located", "skipped", "located"]
    assert locs[0].values == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert locs[0].advantages == [0.0, -1.0, 0.0, 0.0]
    assert locs[1].values == [None] * 6 + [1.0] and locs[1].samples == {}
    assert sorted(locs[0].samples) == [0, 1, 2, 3] and all(len(v) == 4 for v in locs[0].samples.values())
    # explore=all estimates the success too: all values 1 -> no information
    locs = mc(k=4, explore="all").locate(trajs, ScriptedSampler(p), seed=0)
    assert (locs[1].rollouts, locs[1].status) == (24, "undetermined")


def test_all_zero_values_are_undetermined_and_tie_break_decides():
    trajs = [traj(u, 5) for u in range(200)]
    p = {u: [0.0] * 5 for u in range(200)}
    locs = mc(tie_break="earliest").locate(trajs, ScriptedSampler(p), seed=0)
    assert status_counts(locs) == {"undetermined": 200}
    assert {loc.critical for loc in locs} == {0}
    assert agreement(locs, trajs) == {"n": 0, "hits": 0, "agreement": pytest.approx(float("nan"), nan_ok=True),
                                      "undetermined": 0}
    locs = mc(tie_break="random").locate(trajs, ScriptedSampler(p), seed=0)
    hist = critical_step_hist(locs, 5)
    assert sum(hist) == 200 and all(20 <= h <= 60 for h in hist), hist  # 40 expected per step
    # seeded per (seed, uid): batch order does not matter, another seed changes the picks
    again = mc(tie_break="random").locate(trajs[::-1], ScriptedSampler(p), seed=0)[::-1]
    assert [a.critical for a in again] == [b.critical for b in locs]
    other = mc(tie_break="random").locate(trajs, ScriptedSampler(p), seed=1)
    assert [a.critical for a in other] != [b.critical for b in locs]


@pytest.mark.parametrize("make", [mc, bisect, adaptive, guided, lambda: RandomEstimator(EstimatorConfig(name="random")),
                                  lambda: ConfidenceEstimator(EstimatorConfig(name="confidence"))])
def test_single_step_trajectory_is_trivial_without_sampling(make):
    sampler = ScriptedSampler({3: [0.5]})
    (loc,) = make().locate([traj(3, 1)], sampler, seed=0)
    assert (loc.critical, loc.status, loc.rollouts, sampler.calls) == (0, "trivial", 0, 0)


def test_random_picks_uniform_steps_without_rollouts():
    trajs = [traj(u, 4) for u in range(400)] + [traj(400, 4, reward=1.0)]
    sampler = ScriptedSampler({})
    locs = RandomEstimator(EstimatorConfig(name="random")).locate(trajs, sampler, seed=3)
    assert sampler.calls == 0 and sum(loc.rollouts for loc in locs) == 0
    assert status_counts(locs) == {"located": 400, "skipped": 1}
    hist = critical_step_hist(locs, 4)
    assert sum(hist) == 400 and all(70 <= h <= 130 for h in hist), hist  # 100 expected per step


def test_bisect_cost_waves_and_no_repeated_samples():
    n, k = 13, 4
    rng = np.random.default_rng(0)
    errors = rng.integers(0, n, size=50)
    p = {u: [1.0 if i <= e else 0.0 for i in range(n)] for u, e in enumerate(errors)}
    trajs = [traj(u, n, first_error=int(e)) for u, e in enumerate(errors)]
    sampler = ScriptedSampler(p)
    locs = bisect(k=k).locate(trajs, sampler, seed=0)
    assert agreement(locs, trajs)["agreement"] == 1.0
    assert max(loc.rollouts for loc in locs) <= k * math.ceil(math.log2(n)) + k == 20
    assert sampler.calls == 1 + math.ceil(math.log2(n))  # prefix 0, then one wave per bisection level
    assert len(sampler.asked) == len(set(sampler.asked))
    # dead prompt: undetermined, still a critical step from the tie-break
    (loc,) = bisect(tie_break="earliest").locate([traj(0, 6)], ScriptedSampler({0: [0.0] * 6}), seed=0)
    assert (loc.critical, loc.status, loc.rollouts) == (0, "undetermined", 4)
    # explore=all: a success falls back to mc (K per prefix)
    (loc,) = bisect(explore="all").locate([traj(0, 6, reward=1.0)], ScriptedSampler({0: [1, 1, 0, 1, 1, 1]}), seed=0)
    assert (loc.critical, loc.rollouts) in {(1, 24), (2, 24)}  # |A_1| = |A_2| = 1, random tie-break


def test_select_rules_differ_when_a_jump_exceeds_the_drop():
    # V = [0, 1, 0.7, 0]: A = [+1, -0.3, -0.7]
    t = traj(0, 3)
    got = {}
    for select in ("abs", "signed", "value"):
        (loc,) = mc(select=select).locate([t], ScriptedSampler({0: [0.0, 1.0, 0.7]}, exact=True), seed=0)
        assert loc.advantages == pytest.approx([1.0, -0.3, -0.7])
        got[select] = loc.critical
    assert got == {"abs": 0, "signed": 2, "value": 1}


def expected_mc_agreement(p: float, k: int, n: int, e: int) -> float:
    """Exact P(mc with random tie-break picks e) when V_0..V_e ~ Binomial(k, p)/k and V_i = 0 after e.

    Scores are |A_i|: i < e noisy differences, step e is V_e, steps after e are 0. DP over prefixes on
    (last count, max |diff| so far, number of steps tied at that max).
    """
    q = [math.comb(k, c) * p**c * (1 - p) ** (k - c) for c in range(k + 1)]
    state = {(c, -1, 0): q[c] for c in range(k + 1)}
    for _ in range(e):
        nxt: dict[tuple[int, int, int], float] = {}
        for (c, m, t), w in state.items():
            for c2 in range(k + 1):
                d = abs(c2 - c)
                key = (c2, d, 1) if d > m else (c2, m, t + (d == m))
                nxt[key] = nxt.get(key, 0.0) + w * q[c2]
        state = nxt
    zeros = n - 1 - e
    total = 0.0
    for (c, m, t), w in state.items():
        best = max(m, c, 0 if zeros else -1)
        if c == best:
            total += w / (1 + (t if m == best else 0) + (zeros if best == 0 else 0))
    return total


def test_expected_mc_agreement_golden():
    # e = 0: only V_0 is noisy; wrong only when V_0 = 0 (all 4 fail), then 1/n by tie-break
    assert expected_mc_agreement(0.6, 4, 12, 0) == pytest.approx(1 - 0.4**4 + 0.4**4 / 12)
    assert expected_mc_agreement(1.0, 4, 12, 7) == pytest.approx(1.0)


def test_adaptive_beats_mc_at_fewer_tokens_with_noisy_values():
    # 12 steps, success rate 0.6 up to the first error, 0 after; first errors spread evenly
    n, m, p_ok = 12, 300, 0.6
    p = {u: [p_ok if i <= u % n else 0.0 for i in range(n)] for u in range(m)}
    trajs = [traj(u, n, first_error=u % n) for u in range(m)]
    res = {}
    for name, est in {"mc": mc(k=4), "bisect": bisect(k=4), "adaptive": adaptive()}.items():
        sampler = ScriptedSampler(p)
        locs = est.locate(trajs, sampler, seed=0)
        assert len(sampler.asked) == len(set(sampler.asked))
        res[name] = (agreement(locs, trajs)["agreement"], sum(loc.tokens for loc in locs), sampler.calls)
    expected = float(np.mean([expected_mc_agreement(p_ok, 4, n, e) for e in range(n)]))
    assert expected == pytest.approx(0.6308, abs=1e-4)  # K=4 differences are noisy: mc misses 1 in 3
    assert abs(res["mc"][0] - expected) < 4 * math.sqrt(expected * (1 - expected) / m), (res["mc"], expected)
    assert res["mc"][1] == m * mc_tokens(n, 4)
    assert res["adaptive"][0] >= 0.85 and res["adaptive"][0] > res["mc"][0], res
    # k_max=16 draws on each dead probe; they sit after the error (short continuations): ~0.70x mc's tokens
    assert res["adaptive"][1] <= 0.75 * res["mc"][1], res
    # bisect misjudges a live probe when all K=4 fail (0.4^4 = 2.6% per probe, ~4.6 probes): ~0.89
    assert res["bisect"][0] >= 0.8 and res["bisect"][1] < res["mc"][1], res
    assert (res["mc"][2], res["bisect"][2]) == (1, 1 + math.ceil(math.log2(n)))


def test_agreement_counts_only_failed_trajectories_with_known_first_error():
    from gpo_exp.rollout.types import Localization
    trajs = [traj(0, 3, first_error=1), traj(1, 3, first_error=2), traj(2, 3), traj(3, 3, reward=1.0, first_error=0)]
    locs = [Localization([], [], 1, "located"), Localization([], [], 0, "undetermined"),
            Localization([], [], 2, "located"), Localization([], [], 0, "located")]
    assert agreement(locs, trajs) == {"n": 2, "hits": 1, "agreement": 0.5, "undetermined": 1}
    assert critical_step_hist(locs, 2) == [2, 2]


# --- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, key", [({"k": 0}, "estimator.k=0"), ({"select": "max"}, "estimator.select='max'"),
                                      ({"tie_break": "last"}, "estimator.tie_break='last'"),
                                      ({"explore": "none"}, "estimator.explore='none'")])
def test_bad_config_is_a_one_line_error(bad, key):
    with pytest.raises(ConfigError) as err:
        ESTIMATORS.config({"name": "mc", **bad})
    assert key in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        EstimatorConfig(**bad)


def test_yaml_configs_build_registered_estimators():
    assert ESTIMATORS.names() == ["adaptive", "bisect", "confidence", "mc", "random"]
    built = {f.stem: ESTIMATORS.build(OmegaConf.load(f)) for f in sorted(CONF.glob("*.yaml"))}
    assert {k: type(v) for k, v in built.items()} == {
        "adaptive": AdaptiveEstimator, "bisect": BisectEstimator, "confidence": ConfidenceEstimator,
        "mc": MCEstimator, "random": RandomEstimator}
    assert (built["mc"].cfg.k, built["mc"].cfg.select, built["mc"].cfg.explore) == (4, "abs", "failed")
    assert (built["adaptive"].cfg.k_max, built["adaptive"].cfg.batch, built["adaptive"].cfg.k_root,
            built["adaptive"].cfg.risk, built["adaptive"].cfg.prior) == (32, 2, 64, 0.05, "confidence")
    with pytest.raises(ConfigError, match="k_max"):
        ESTIMATORS.config({"name": "adaptive", "k_max": 0})


def test_sibling_trajectories_are_free_samples_of_the_prefixes_they_pass_through():
    """Two failed trajectories and one success share a prompt; the success shares their first step.

    The success is a free draw from prefix 0 and prefix 1 of each failure (not from prefix 2, where it
    leaves their path), so V_0 > 0 is known before any rollout and the cost counts generated tokens only.
    """
    prompt = [7]
    a = Trajectory(prompt, [1, 1, 2, 2, 3, 3], 0.0, [2, 4, 6], uid=0)
    b = Trajectory(prompt, [1, 1, 2, 2, 4, 4], 0.0, [2, 4, 6], uid=1)
    ok = Trajectory(prompt, [1, 1, 5, 5, 5, 5], 1.0, [2, 4, 6], uid=2)
    sampler = ScriptedSampler({0: [1.0, 1.0, 0.0], 1: [1.0, 1.0, 0.0], 2: [1.0, 1.0, 1.0]})
    locs = mc(k=2).locate([a, b, ok], sampler, seed=0)
    free = {i: [c for c in locs[0].samples[i] if not c.drawn] for i in locs[0].samples}
    assert [(c.ids, c.reward) for c in free[0]] == [([1, 1, 2, 2, 4, 4], 0.0), ([1, 1, 5, 5, 5, 5], 1.0)]
    assert [(c.ids, c.reward) for c in free[1]] == [([2, 2, 4, 4], 0.0), ([5, 5, 5, 5], 1.0)]
    assert [(c.ids, c.reward) for c in free[2]] == [([4, 4], 0.0)]  # b's step 2 differs: only b's tail
    # mc tops every prefix up to K=2 with generated draws (here: one, from prefix 2, which a and b share:
    # drawn once, by a, free to b); costs count only what a trajectory asked for
    drawn = [c for cs in locs[0].samples.values() for c in cs if c.drawn]
    assert len(drawn) == 1 == locs[0].rollouts and locs[0].tokens == len(drawn[0].ids) == L
    assert [c.drawn for c in locs[1].samples[2]] == [False, True] and locs[1].rollouts == 0
    assert sampler.asked == [(0, 2, 0)]  # one generation for the two trajectories' shared prefix
    assert locs[0].values == [0.5, 0.5, 0.0, 0.0]  # V_0, V_1 from the free draws; V_3 = the reward
    off = mc(k=2, reuse_siblings=False).locate([a, b, ok], sampler, seed=0)
    assert off[0].rollouts == 6 and all(c.drawn for cs in off[0].samples.values() for c in cs)


def test_calibrated_probe_cap_follows_the_prompts_success_rate():
    est = adaptive(k_max=16, risk=0.05)
    root = [Continuation([0], 1.0)] + [Continuation([0], 0.0)] * 3  # 1 of 4: c = 2/6, (2/3)^8 < 0.05 < (2/3)^7
    assert est._probe_cap(root) == 8
    assert est._probe_cap([Continuation([0], 1.0)] * 4) == 2  # c = 5/6: two failures already make dead likely
    assert est._probe_cap([Continuation([0], 1.0)] + [Continuation([0], 0.0)] * 40) == 16  # capped at k_max
    assert adaptive(k_max=16, risk=None)._probe_cap(root) == 16  # risk unset: always k_max


def test_k_root_spends_more_on_the_prompt_before_giving_up():
    # success rate 0.1 until the error at step 3: k_max=4 at the prompt usually sees no success
    n, m = 5, 200
    p = {u: [0.1 if i <= 3 else 0.0 for i in range(n)] for u in range(m)}
    trajs = [traj(u, n, first_error=3) for u in range(m)]
    small = agreement(adaptive(k_max=4, batch=1, k_root=None, risk=None).locate(trajs, ScriptedSampler(p), seed=0), trajs)
    rooted = agreement(adaptive(k_max=64, k_root=32, risk=0.05, batch=4).locate(trajs, ScriptedSampler(p), seed=0),
                       trajs)
    # P(no success in 4) = 0.66, in 32 = 0.034: undetermined falls from ~132 to ~7 of 200
    assert small["undetermined"] > 110 and rooted["undetermined"] < 20, (small, rooted)
    assert rooted["agreement"] > small["agreement"] + 0.3, (small, rooted)


def test_grow_doubles_a_probes_draws_per_wave():
    # the prompt never succeeds: k_root=64 draws in waves of 2 (32 calls) or 2, 2, 4, 8, 16, 32 (6 calls)
    for grow, calls in ((False, 32), (True, 6)):
        sampler = ScriptedSampler({0: [0.0] * 4})
        (loc,) = adaptive(k_root=64, grow=grow).locate([traj(0, 4)], sampler, seed=0)
        assert (loc.status, loc.rollouts, sampler.calls) == ("undetermined", 64, calls)


# --- the confidence prior ------------------------------------------------------------------------
def test_step_confidence_is_each_steps_least_likely_token():
    t = Trajectory([1], [5, 6, 7, 8, 9], 0.0, [2, 5], token_logprobs=[-0.1, -2.0, -0.3, -0.2, -0.5])
    assert t.step_confidence() == [-2.0, -0.5]
    with pytest.raises(ValueError, match="trajectory 0 has no token log-probs"):
        Trajectory([1], [5, 6], 0.0, [2]).step_confidence()


def test_confidence_picks_the_least_likely_step_without_rollouts():
    trajs = [traj(0, 4, conf=[-0.1, -3.0, -0.5, -0.2]), traj(1, 3, conf=[-0.2, -0.2, -4.0]),
             traj(2, 3, reward=1.0, conf=[-9.0, -0.1, -0.1])]
    sampler = ScriptedSampler({})
    locs = ConfidenceEstimator(EstimatorConfig(name="confidence")).locate(trajs, sampler, seed=0)
    assert [(loc.critical, loc.status, loc.rollouts) for loc in locs] == [(1, "located", 0), (2, "located", 0),
                                                                        (None, "skipped", 0)]
    assert sampler.calls == 0
    ties = [traj(u, 4, conf=[-1.0] * 4) for u in range(200)]
    picks = [loc.critical for loc in ConfidenceEstimator(EstimatorConfig(name="confidence")).locate(
        ties, sampler, seed=0)]
    assert set(picks) == {0, 1, 2, 3}  # equal confidence everywhere: tie_break=random
    with pytest.raises(ValueError, match="no token log-probs"):
        ConfidenceEstimator(EstimatorConfig(name="confidence")).locate([traj(0, 3)], sampler, seed=0)


def test_guided_search_with_a_right_prior_probes_two_prefixes():
    # V = 1 up to prefix 2, 0 after; the least likely token is in step 2, the first error
    sampler = ScriptedSampler({0: [1, 1, 1, 0, 0]})
    (loc,) = guided().locate([traj(0, 5, first_error=2, conf=[-0.1, -0.3, -4.0, -1.0, -0.1])], sampler, seed=0)
    assert (loc.critical, loc.status) == (2, "located")
    # prefix 2: one wave of 2 draws, both succeed (c = 3/4); prefix 3: (1/4)^3 <= 0.05 -> 3 draws, all fail
    assert sorted(loc.samples) == [2, 3] and (len(loc.samples[2]), len(loc.samples[3])) == (2, 3)
    assert loc.values[:5] == [None, None, 1.0, 0.0, None] and loc.rollouts == 5
    assert sampler.calls == 3  # waves: prefix 2, then prefix 3 twice (2 + 1 draws)


@pytest.mark.parametrize("boundary", range(5))
def test_guided_search_finds_the_boundary_whatever_the_prior_says(boundary):
    """Deterministic values: the search must end at the true boundary from any least confident step."""
    n = 5
    p = {u: [1.0 if i <= boundary else 0.0 for i in range(n)] for u in range(n)}
    confs = {u: [-4.0 if i == u else -0.5 - 0.1 * i for i in range(n)] for u in range(n)}  # prior says step u
    trajs = [traj(u, n, first_error=boundary, conf=confs[u]) for u in range(n)]
    sampler = ScriptedSampler(p)
    locs = guided().locate(trajs, sampler, seed=0)
    assert [loc.critical for loc in locs] == [boundary] * n and {loc.status for loc in locs} == {"located"}
    assert len(sampler.asked) == len(set(sampler.asked))  # no prefix is ever sampled twice
    right = locs[boundary]  # the prior pointed at the boundary: prefix b, and prefix b+1 unless it is the trajectory
    assert sorted(right.samples) == [boundary] + ([boundary + 1] if boundary + 1 < n else [])


def test_guided_search_with_all_prefixes_dead_is_undetermined_after_k_root_draws():
    sampler = ScriptedSampler({0: [0.0] * 4})
    (loc,) = guided(k_root=10).locate([traj(0, 4, conf=[-0.1, -0.1, -3.0, -0.1])], sampler, seed=0)
    assert loc.status == "undetermined"
    # prefix 2 (the prior), then the least confident of 0..1 (prefix 0, earliest on a tie), 10 draws each
    assert sorted(loc.samples) == [0, 2] and all(len(v) == 10 for v in loc.samples.values())
    # no boundary: the critical step is the prior's own guess (the least confident step), not a coin flip
    assert loc.critical == 2


def test_guided_search_beats_plain_bisection_at_fewer_tokens_with_noisy_values():
    # 12 steps, success 0.6 up to the first error, 0 after; the prior is right for 90% of trajectories
    n, m, p_ok = 12, 300, 0.6
    rng = np.random.default_rng(0)
    p = {u: [p_ok if i <= u % n else 0.0 for i in range(n)] for u in range(m)}
    confs = {}
    for u in range(m):
        c = list(-rng.uniform(0.0, 1.0, n))
        c[u % n if rng.random() < 0.9 else int(rng.integers(n))] = -5.0
        confs[u] = c
    trajs = [traj(u, n, first_error=u % n, conf=confs[u]) for u in range(m)]
    res = {}
    for name, est in {"plain": adaptive(), "guided": guided()}.items():
        locs = est.locate(trajs, ScriptedSampler(p), seed=0)
        res[name] = (agreement(locs, trajs)["agreement"], sum(loc.tokens for loc in locs))
    # ~2 probes instead of ~4.6: fewer verdicts that can go wrong (each calibrated to risk 0.05) and fewer
    # draws, except where a wrong prior points past the error: its dead probe takes k_root draws
    assert res["guided"][0] >= 0.97 and res["guided"][0] >= res["plain"][0] + 0.05, res
    assert res["guided"][1] <= 0.8 * res["plain"][1], res


@pytest.mark.parametrize("bad", [{"k_root": 0}, {"risk": 0.0}, {"risk": 1.0}, {"prior": "entropy"}])
def test_adaptive_calibration_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        AdaptiveConfig(**bad)


@pytest.mark.parametrize("make", [mc, bisect, adaptive])
def test_probe_temperature_reaches_every_sampler_call(make):
    p = {u: [0.9, 0.9, 0.0, 0.0] for u in range(4)}
    trajs = [traj(u, 4, first_error=2) for u in range(4)]
    probed = ScriptedSampler(p)
    make(temperature=0.5).locate(trajs, probed, seed=0)
    assert probed.calls > 0 and probed.temperatures == [0.5] * probed.calls
    plain = ScriptedSampler(p)
    make().locate(trajs, plain, seed=0)
    assert plain.temperatures == [None] * plain.calls  # default: the policy's own temperature


def test_probe_temperature_must_be_positive():
    with pytest.raises(ConfigError, match="estimator.temperature"):
        EstimatorConfig(temperature=0.0)


def test_reset_groups_reuse_estimation_switch():
    """Probes drawn at another temperature are not policy samples: the round then trains on fresh draws only."""
    from gpo_exp.rollout.gpo_round import GPOConfig, reset_groups

    p = {u: [0.9, 0.9, 0.0, 0.0] for u in range(3)}
    trajs = [traj(u, 4, first_error=2) for u in range(3)]
    sampler = ScriptedSampler(p)
    locs = mc(k=2).locate(trajs, sampler, seed=0)
    cfg = GPOConfig(reset_samples=2, include_original=False)
    fresh_only = reset_groups(trajs, locs, sampler, cfg, reuse_estimation=False)
    reused = reset_groups(trajs, locs, sampler, cfg)
    assert [len(g.continuations) for g in fresh_only] == [2, 2, 2]
    assert [len(g.continuations) for g in reused] == [4, 4, 4]  # + the estimator's K=2 from the reset prefix
