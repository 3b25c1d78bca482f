"""Critical-step estimators: which step of a trajectory decided its outcome (the core of GPO).

Notation (see types.py): prefix i is the prompt plus the first i steps, V_i its value (mean reward of
continuations sampled from it), V_n = the trajectory's own reward (never sampled), A_i = V_{i+1} - V_i
the advantage of step i. Resetting to prefix `critical` regenerates the critical step.

  mc        the paper: K continuations from every prefix 0..n-1 in one batched call, critical step by
            `select` over the advantages.
  random    Satori-style ablation: a uniformly random step, no rollouts.
  bisect    OmegaPRM-style binary search for where V collapses to 0 (K rollouts per probe).
  adaptive  bisection with sequential probes: draw until the first success (V > 0 proven) or k_max
            failures (V ~ 0); finds the first wrong step more reliably than mc at fewer tokens. With
            prior=confidence it probes first around the step holding the policy's least likely token.
  confidence  no rollouts: the step holding the least likely token the policy sampled (the prior alone).

Every estimator gathers its requests across all trajectories and calls the sampler once per wave, and
never samples a prefix twice: draws are cached per (uid, step) and extended with a larger offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import numpy as np

from gpo_exp.registry import Registry, check
from gpo_exp.rollout.types import Continuation, ContinuationSampler, Job, Localization, Trajectory

SELECTS = ("abs", "signed", "value")
TIE_BREAKS = ("random", "earliest")
EXPLORES = ("failed", "all")
PRIORS = ("none", "confidence")


@dataclass
class EstimatorConfig:
    """Fields every estimator has; `random` ignores k and select, bisect/adaptive use them only for
    the mc fallback on successful trajectories (explore=all)."""

    name: str = "mc"  # registry name: mc | random | bisect | adaptive | confidence
    k: int = 4  # continuations per estimated prefix (paper: K=4)
    select: str = "abs"  # abs: argmax |A_i| (paper) | signed: argmin A_i (largest drop) | value: argmax_{i<n} V_i (authors' early code: the most promising prefix)
    tie_break: str = "random"  # among equal scores: random (seeded per trajectory) | earliest
    explore: str = "failed"  # failed: only trajectories with reward 0 (authors' code) | all
    reuse_siblings: bool = True  # siblings (same prompt) share what they know of a shared prefix: each other's tokens as free samples and each other's draws (beyond the paper)
    temperature: float | None = None  # sampling temperature of the value probes (null: the policy's, engine.temperature); lower sharpens the drop at an error

    def __post_init__(self) -> None:
        check(self.k >= 1, "estimator.k", self.k, ">= 1")
        check(self.select in SELECTS, "estimator.select", self.select, f"one of {', '.join(SELECTS)}")
        check(self.tie_break in TIE_BREAKS, "estimator.tie_break", self.tie_break, f"one of {', '.join(TIE_BREAKS)}")
        check(self.explore in EXPLORES, "estimator.explore", self.explore, f"one of {', '.join(EXPLORES)}")
        check(self.temperature is None or self.temperature > 0, "estimator.temperature", self.temperature, "> 0 or null")


@dataclass
class AdaptiveConfig(EstimatorConfig):
    """Sequential probes: one success settles V > 0, k_max failures settle V ~ 0."""

    name: str = "adaptive"  # registry name (estimator=adaptive)
    k_max: int = 32  # most draws per probe; a prefix with success rate p is misjudged as dead w.p. (1-p)^k_max
    batch: int = 2  # draws per open probe in its first wave (raise for fewer, larger generate calls)
    grow: bool = False  # true: each later wave of a probe draws as many as it has so far (2, 2, 4, 8, ...): log-many waves for hard prefixes, same verdict for a given cap (~0.75x wall time, ~1.1x tokens here)
    k_root: int | None = 64  # most draws at a probe while no live prefix is known (plain bisection: the prompt) (null: k_max)
    risk: float | None = 0.05  # calibrated probes: draw until P(dead verdict | V = c) <= risk, c = a live reference prefix's smoothed success rate (null: always k_max)
    prior: str = "confidence"  # which boundary to test first: confidence (around the step with the least likely sampled token) | none (plain bisection)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k_max >= 1, "estimator.k_max", self.k_max, ">= 1")
        check(self.batch >= 1, "estimator.batch", self.batch, ">= 1")
        check(self.k_root is None or self.k_root >= 1, "estimator.k_root", self.k_root, ">= 1 or null")
        check(self.risk is None or 0 < self.risk < 1, "estimator.risk", self.risk, "in (0, 1) or null")
        check(self.prior in PRIORS, "estimator.prior", self.prior, f"one of {', '.join(PRIORS)}")


ESTIMATORS: Registry["Estimator"] = Registry("estimator")

# A plan explores one trajectory: it yields the (prefix, n_more) draws it needs for the next wave and
# finally returns (critical, status). The driver runs all plans in lock-step, one sampler call per wave.
Request = tuple[int, int]
Plan = Generator[list[Request], None, tuple[int, str]]


class Draws:
    """Every continuation drawn in one `locate` call; the only caller of the sampler.

    Keyed by (uid, prefix), or with `share` by the prefix's tokens: a prefix's value does not depend on
    which trajectory reached it, so sibling trajectories (same prompt) that share a prefix share its
    draws, and a probe one of them already paid for is free to the others. Each drawn continuation
    records the uid that asked for it (its cost is that trajectory's); a sibling's own trajectory,
    reused as a free sample (`seed_siblings`), is never a sample of its own prefixes.
    """

    def __init__(self, sample: ContinuationSampler, temperature: float | None = None, share: bool = False) -> None:
        self.sample = sample
        self.temperature = temperature
        self.share = share
        self.store: dict[Any, list[Continuation]] = {}
        self.owner: dict[Any, list[int]] = {}  # per stored continuation: the uid that drew it (or whose trajectory it is)
        self.calls = 0

    def key(self, traj: Trajectory, step: int) -> Any:
        return tuple(traj.prefix_ids(step)) if self.share else (traj.uid, step)

    def _add(self, key: Any, conts: Sequence[Continuation], uid: int) -> None:
        self.store.setdefault(key, []).extend(conts)
        self.owner.setdefault(key, []).extend([uid] * len(conts))

    def get(self, traj: Trajectory, step: int) -> list[Continuation]:
        key = self.key(traj, step)
        return [c for c, o in zip(self.store.get(key, []), self.owner.get(key, []))
                if c.drawn or o != traj.uid]  # a trajectory is not a sample of its own prefixes

    def paid(self, traj: Trajectory, step: int) -> list[Continuation]:
        """The continuations of prefix `step` that `traj` asked the sampler for (its generation cost)."""
        key = self.key(traj, step)
        return [c for c, o in zip(self.store.get(key, []), self.owner.get(key, [])) if c.drawn and o == traj.uid]

    def seed_siblings(self, trajs: Sequence[Trajectory]) -> None:
        """Free samples: a sibling trajectory (same prompt) whose tokens start with prefix i of `t` is a
        draw from prefix i, so its remaining tokens and reward count towards V_i at no generation cost."""
        by_prompt: dict[tuple[int, ...], list[Trajectory]] = {}
        for t in trajs:
            by_prompt.setdefault(tuple(t.prompt_ids), []).append(t)
        for group in by_prompt.values():
            if self.share:  # content keys: each trajectory once at each of its prefixes, seen by its siblings
                for s in group:
                    for i in range(s.n_steps):
                        cut = s.prefix_len(i)
                        self._add(self.key(s, i), [Continuation(ids=s.completion_ids[cut:], reward=s.reward,
                                                                drawn=False)], s.uid)
                continue
            for t in group:
                for s in group:
                    if s is t:
                        continue
                    for i in range(t.n_steps):
                        cut = t.prefix_len(i)
                        if len(s.completion_ids) <= cut or s.completion_ids[:cut] != t.completion_ids[:cut]:
                            break  # prefixes only grow: once s leaves t's path it never rejoins
                        self._add(self.key(t, i), [Continuation(ids=s.completion_ids[cut:], reward=s.reward,
                                                                drawn=False)], s.uid)

    def value(self, traj: Trajectory, step: int) -> float | None:
        """V_step: the trajectory's reward for the full prefix, else the mean drawn reward (None if none)."""
        if step == traj.n_steps:
            return float(traj.reward)
        got = self.get(traj, step)
        return float(np.mean([c.reward for c in got])) if got else None

    def wave(self, requests: Sequence[tuple[Trajectory, int, int]]) -> None:
        """Draw n more continuations of each (traj, prefix) in one sampler call; offsets continue the cache.

        Requests for one key in one wave are merged: the first asker draws the largest n asked and the
        others see those draws free (with `share`, siblings asking for one shared prefix)."""
        want: dict[Any, tuple[Trajectory, int, int]] = {}
        for traj, step, n in requests:
            assert 0 <= step < traj.n_steps and n >= 1, (step, n)  # V_n is the reward, never sampled
            key = self.key(traj, step)
            first = want.get(key)
            want[key] = (traj, step, n) if first is None else (first[0], first[1], max(first[2], n))
        jobs, owners = [], []
        for key, (traj, step, n) in want.items():
            jobs.append(Job(traj, step, n, sum(c.drawn for c in self.store.get(key, []))))
            owners.append((key, traj.uid))
        if not jobs:
            return
        out = self.sample(jobs) if self.temperature is None else self.sample(jobs, temperature=self.temperature)
        self.calls += 1
        if len(out) != len(jobs) or any(len(c) != j.n for c, j in zip(out, jobs)):
            raise RuntimeError(f"sampler returned {[len(c) for c in out]} continuations for jobs asking {[j.n for j in jobs]}")
        for (key, uid), conts in zip(owners, out):
            self._add(key, conts, uid)


def _rng(seed: int, uid: int) -> np.random.Generator:
    """Per-trajectory generator, so a trajectory's choices do not depend on batch order."""
    return np.random.default_rng([seed & (2**63 - 1), uid & (2**63 - 1), 0x6770_6F])


class Estimator:
    """Base: handles skipping, trivial trajectories, batching and bookkeeping; subclasses write `plan`."""

    draws_rollouts = True  # False: the estimator samples nothing (random, confidence), so it has no draws to reuse

    def __init__(self, cfg: EstimatorConfig) -> None:
        self.cfg = cfg

    def plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        """Explore one trajectory (n_steps >= 2). Yield request lists; return (critical, status)."""
        raise NotImplementedError

    def locate(self, trajs: list[Trajectory], sample: ContinuationSampler, seed: int,
               only: set[int] | None = None) -> list[Localization]:
        """Localise `trajs` (those whose uid is in `only`, when given; the others are "skipped" but still
        lend their tokens as sibling samples)."""
        uids = [t.uid for t in trajs]
        if len(set(uids)) != len(uids):
            raise ValueError(f"trajectory uids must be unique within a round, got duplicates in {sorted(uids)}")
        draws = Draws(sample, self.cfg.temperature, share=self.cfg.reuse_siblings)
        if self.cfg.reuse_siblings:
            draws.seed_siblings(trajs)
        found: dict[int, tuple[int | None, str]] = {}
        plans: dict[int, Plan] = {}
        for idx, traj in enumerate(trajs):
            rng = _rng(seed, traj.uid)
            if (self.cfg.explore == "failed" and traj.reward > 0) or (only is not None and traj.uid not in only):
                found[idx] = (None, "skipped")
            elif traj.n_steps <= 1:
                found[idx] = (0, "trivial")  # nothing to choose: reset to the prompt
            else:
                plans[idx] = self.plan(traj, draws, rng)
        found.update(self._drive(plans, trajs, draws))
        return [self._localization(traj, draws, *found[idx]) for idx, traj in enumerate(trajs)]

    @staticmethod
    def _drive(plans: dict[int, Plan], trajs: list[Trajectory], draws: Draws) -> dict[int, tuple[int, str]]:
        """Run all plans in lock-step: gather every open plan's requests into one sampler call per wave."""
        done: dict[int, tuple[int, str]] = {}
        pending: dict[int, list[Request]] = {}

        def advance(idx: int, first: bool) -> None:
            try:
                reqs = next(plans[idx]) if first else plans[idx].send(None)
                assert reqs, "a plan must request at least one draw per wave"
                pending[idx] = reqs
            except StopIteration as stop:
                done[idx] = stop.value

        for idx in plans:
            advance(idx, first=True)
        while pending:
            draws.wave([(trajs[idx], step, n) for idx, reqs in pending.items() for step, n in reqs])
            waiting, pending = list(pending), {}
            for idx in waiting:
                advance(idx, first=False)
        return done

    @staticmethod
    def _localization(traj: Trajectory, draws: Draws, critical: int | None, status: str) -> Localization:
        n = traj.n_steps
        values = [draws.value(traj, i) for i in range(n + 1)]
        advantages = [None if a is None or b is None else b - a for a, b in zip(values[:-1], values[1:])]
        samples = {i: list(draws.get(traj, i)) for i in range(n) if draws.get(traj, i)}
        conts = [c for i in range(n) for c in draws.paid(traj, i)]  # cost: what this trajectory asked to generate
        return Localization(values=values, advantages=advantages, critical=critical, status=status,
                            rollouts=len(conts), tokens=sum(len(c.ids) for c in conts), samples=samples)

    # --- shared pieces --------------------------------------------------------------------------
    def _tie(self, candidates: Sequence[int], rng: np.random.Generator) -> int:
        if self.cfg.tie_break == "earliest":
            return int(min(candidates))
        return int(rng.choice(np.asarray(candidates)))

    def _least_confident(self, conf: Sequence[float], rng: np.random.Generator) -> int:
        """The step holding the least likely sampled token (ties by tie_break): `confidence`'s pick."""
        c = np.asarray(conf)
        return self._tie(np.flatnonzero(c == c.min()).tolist(), rng)

    def _undetermined(self, traj: Trajectory, rng: np.random.Generator) -> tuple[int, str]:
        """No information in the values: still pick a step (by tie-break over all) so the caller may reset."""
        return self._tie(range(traj.n_steps), rng), "undetermined"

    def _select(self, values: Sequence[float], rng: np.random.Generator) -> tuple[int, str]:
        """Critical step from fully estimated V_0..V_n by `select`, ties broken by `tie_break`."""
        v = np.asarray(values, dtype=float)
        n = len(v) - 1
        if np.allclose(v, v[0], rtol=0, atol=1e-9):
            return self._tie(range(n), rng), "undetermined"
        adv = np.diff(v)
        score = {"abs": np.abs(adv), "signed": -adv, "value": v[:-1]}[self.cfg.select]
        best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-9))
        return self._tie(best.tolist(), rng), "located"

    def _mc_plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        """The paper's estimate: K continuations of every prefix 0..n-1 in one wave, then `select`."""
        need = [(i, self.cfg.k - len(draws.get(traj, i))) for i in range(traj.n_steps)]
        need = [(i, m) for i, m in need if m > 0]
        if need:
            yield need
        values = [draws.value(traj, i) for i in range(traj.n_steps + 1)]
        return self._select(values, rng)  # type: ignore[arg-type]

    def _bisect(self, traj: Trajectory, probe: Callable[[int], Generator[list[Request], None, bool]],
                rng: np.random.Generator) -> Plan:
        """Binary search for the last prefix whose value is > 0 on a failed trajectory (V_n = 0).

        Invariant: prefix lo is alive (V > 0), prefix hi is dead (V = 0; hi starts at n, the failed
        trajectory itself). The critical step is lo: its prefix can still succeed, the one after it cannot.
        If the prompt itself (prefix 0) looks dead the values carry no information: undetermined.
        """
        if not (yield from probe(0)):
            return self._undetermined(traj, rng)
        lo, hi = 0, traj.n_steps
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if (yield from probe(mid)):
                lo = mid
            else:
                hi = mid
        return lo, "located"


@ESTIMATORS.register("mc", EstimatorConfig)
class MCEstimator(Estimator):
    """GPO (paper): MC values of every prefix with K rollouts each, one sampler call for the whole batch."""

    def plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        return self._mc_plan(traj, draws, rng)


@ESTIMATORS.register("random", EstimatorConfig)
class RandomEstimator(Estimator):
    """Satori-style ablation: reset at a uniformly random step; no rollouts."""

    draws_rollouts = False

    def plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        return int(rng.integers(traj.n_steps)), "located"
        yield []  # unreachable: makes this a generator that requests nothing


@ESTIMATORS.register("bisect", EstimatorConfig)
class BisectEstimator(Estimator):
    """OmegaPRM-style binary search with K rollouts per probe: K * (1 + ceil(log2 n)) rollouts, one wave
    per level. A probe's prefix is alive iff any of its K rewards is > 0.

    V_0 = 0 (no rollout from the prompt succeeds): undetermined, critical by tie-break over all steps.
    Successful trajectories (explore=all) have no collapse to search for: they fall back to mc (K per
    prefix, in the first wave, `select` over the advantages).
    """

    def plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        if traj.reward > 0:
            return (yield from self._mc_plan(traj, draws, rng))

        def probe(step: int) -> Generator[list[Request], None, bool]:
            if len(draws.get(traj, step)) < self.cfg.k:
                yield [(step, self.cfg.k - len(draws.get(traj, step)))]
            return (draws.value(traj, step) or 0.0) > 0

        return (yield from self._bisect(traj, probe, rng))


@ESTIMATORS.register("adaptive", AdaptiveConfig)
class AdaptiveEstimator(Estimator):
    """Bisection with sequential probes (beyond the paper).

    A probe draws `batch` continuations per wave and stops as soon as its answer is settled: the first
    success proves V > 0 (rewards are final-answer correctness, so one success is conclusive); k_max
    failures settle V ~ 0. Live prefixes cost ~1/p draws instead of K, and dead prefixes lie after the
    error, where continuations are short, so the total is below mc's n*K long continuations while a live
    prefix is misjudged only w.p. (1-p)^k_max (0.4^8 < 0.1% at p = 0.6, vs mc's argmax over noisy K=4
    differences). No local refinement is needed: a "live" verdict is exact, and under the monotone-value
    assumption (a wrong intermediate result is never recovered) the boundary lo/lo+1 is the first error.

    prior=confidence orders the search by the policy's own token log-probs: a sampled error is usually
    a token the policy thought unlikely, so the first hypothesis tested is "the step holding the least
    likely token is the first error" (prefix before it alive, prefix after it dead: two probes). The
    probes still decide; a wrong hypothesis only moves the search into the half the probes point to.

    All probed prefixes judged 0 -> undetermined, at the least confident step with prior=confidence (the
    values say nothing, the prior still does) or by tie-break with prior=none; successful trajectories
    (explore=all) -> mc fallback, as in bisect.
    """

    cfg: AdaptiveConfig

    def plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        if traj.reward > 0:
            return (yield from self._mc_plan(traj, draws, rng))

        def probe(step: int, ref: int | None = 0) -> Generator[list[Request], None, bool]:
            """Is prefix `step` alive? At most k_root draws without a known live prefix `ref` (or at the
            prompt), else as many as `ref`'s success rate calls for (_probe_cap)."""
            cap = (self.cfg.k_root or self.cfg.k_max) if ref is None or step == 0 else self._probe_cap(draws.get(traj, ref))
            while True:
                got = draws.get(traj, step)
                if any(c.reward > 0 for c in got):
                    return True
                if len(got) >= cap:
                    return False
                more = max(self.cfg.batch, len(got)) if self.cfg.grow else self.cfg.batch
                yield [(step, min(more, cap - len(got)))]

        if self.cfg.prior == "none":
            return (yield from self._bisect(traj, probe, rng))
        return (yield from self._guided(traj, draws, probe, rng))

    def _guided(self, traj: Trajectory, draws: Draws, probe: Callable[..., Generator[list[Request], None, bool]],
                rng: np.random.Generator) -> Plan:
        """Search for the live/dead boundary, testing the least confident step left first.

        Invariant: prefix lo is alive (None: none known yet), prefix hi is dead (hi starts at n, the failed
        trajectory). Each round tests "step c is the boundary" for the least confident step c in [lo, hi):
        prefix c alive (skipped when c == lo) and prefix c + 1 dead (skipped when c + 1 == hi). Either
        answer shrinks [lo, hi); the search ends at hi = lo + 1 (critical = lo) or hi = 0 (every prefix
        down to the prompt dead: undetermined).
        """
        conf = traj.step_confidence()
        # a sibling's success (reuse_siblings) already proves the prompt alive and calibrates the probes
        lo: int | None = 0 if any(c.reward > 0 for c in draws.get(traj, 0)) else None
        hi = traj.n_steps
        while lo is None or hi - lo > 1:
            c = min(range(lo or 0, hi), key=lambda i: (conf[i], i))
            if lo is None or c > lo:
                if not (yield from probe(c, ref=lo)):
                    hi = c
                    if hi == 0:  # every prefix judged dead: no boundary, so the prior's own guess
                        return self._least_confident(conf, rng), "undetermined"
                    continue
                lo = c
            if c + 1 < hi:
                if (yield from probe(c + 1, ref=lo)):
                    lo = c + 1
                else:
                    hi = c + 1
        return lo, "located"

    def _probe_cap(self, ref: Sequence[Continuation]) -> int:
        """Draws a probe may take before its prefix is called dead.

        Fixed k_max, or with `risk` set: enough draws that a prefix as good as a live reference prefix
        (smoothed success rate c = (s + 1) / (n + 2) of its draws; the prompt in plain bisection, the
        nearest live prefix below with the confidence prior) is misjudged dead with probability
        (1 - c)^k <= risk. Correct steps keep V near the reference's value, so it calibrates the probes:
        few draws for prompts the policy usually solves, more for hard ones.
        """
        if self.cfg.risk is None:
            return self.cfg.k_max
        c = (sum(x.reward > 0 for x in ref) + 1) / (len(ref) + 2)
        return max(1, min(self.cfg.k_max, math.ceil(math.log(self.cfg.risk) / math.log(1 - c))))


@ESTIMATORS.register("confidence", EstimatorConfig)
class ConfidenceEstimator(Estimator):
    """The prior alone, no rollouts: the step holding the least likely token the policy sampled
    (min over the step's tokens of log p; ties by tie_break). Needs the engine's token log-probs."""

    draws_rollouts = False

    def plan(self, traj: Trajectory, draws: Draws, rng: np.random.Generator) -> Plan:
        return self._least_confident(traj.step_confidence(), rng), "located"
        yield []  # unreachable: makes this a generator that requests nothing


# --- diagnostics ----------------------------------------------------------------------------------
def agreement(locs: Sequence[Localization], trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """How often the critical step is the ground-truth first wrong step.

    Counts failed trajectories (reward 0) whose first_error is known. Returns n, hits,
    agreement = hits / n (nan when n = 0) and undetermined (how many of the n had no information).
    """
    pairs = [(loc, t) for loc, t in zip(locs, trajs, strict=True)
             if t.reward <= 0 and t.first_error is not None and loc.status != "skipped"]
    hits = sum(loc.critical == t.first_error for loc, t in pairs)
    return {"n": len(pairs), "hits": hits, "agreement": hits / len(pairs) if pairs else float("nan"),
            "undetermined": sum(loc.status == "undetermined" for loc, _ in pairs)}


def critical_step_hist(locs: Sequence[Localization], n_max: int) -> list[int]:
    """Counts of critical steps 0..n_max-1 (steps >= n_max go to the last bin; None is left out)."""
    hist = [0] * n_max
    for loc in locs:
        if loc.critical is not None:
            hist[min(loc.critical, n_max - 1)] += 1
    return hist


def status_counts(locs: Sequence[Localization]) -> dict[str, int]:
    """Number of localizations per status (located, undetermined, trivial, skipped)."""
    out: dict[str, int] = {}
    for loc in locs:
        out[loc.status] = out.get(loc.status, 0) + 1
    return out
