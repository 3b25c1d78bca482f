"""One round of data collection: sample, split, locate the critical step, reset, and group candidates.

    trajectories (samples_per_prompt per prompt)
      -> estimator.locate                     values, advantages, critical step per explored trajectory
      -> reset: M continuations from the prefix before the critical step (+ reused estimation rollouts,
         + the trajectory's own continuation)
      -> groups of scored candidates sharing a prefix            (optimizers turn these into examples)

With GPO disabled the groups are the prompts themselves with their whole trajectories, so the two
arms differ only in GPO.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from gpo_exp.benchmarks.base import StepsConfig
from gpo_exp.registry import check
from gpo_exp.rollout.diagnostics import round_counts, round_diagnostics
from gpo_exp.rollout.estimators import ESTIMATORS, Estimator, agreement, critical_step_hist, status_counts
from gpo_exp.rollout.types import Continuation, Group, Job, Localization, Trajectory

if TYPE_CHECKING:  # type only: config validation imports GPOConfig before transformers
    from gpo_exp.rollout.sampler import PolicySampler

HIST_BINS = 12  # critical-step histogram bins (the last bin collects steps >= 11)


@dataclass
class GPOConfig:
    enabled: bool = True  # true: reset to the critical step (GPO); false: whole-trajectory examples from the prompt
    prompts_per_round: int = 64  # training prompts sampled each round
    samples_per_prompt: int = 4  # trajectories sampled per prompt (the baseline's group size)
    reset_samples: int = 4  # M: new continuations sampled from each reset prefix
    reuse_estimation: bool = True  # add the estimator's rollouts from the reset prefix to the reset candidates
    include_original: bool = True  # the trajectory's own continuation from the reset prefix is a candidate too
    reset_undetermined: bool = True  # also reset trajectories whose values carry no information (tie-break step)
    pairs_per_group: int = 2  # preference pairs drawn from one group of candidates (2 lets the baseline reach the cap too)
    examples_per_round: int = 64  # cap on training examples (pairs, or rollout groups) per round, both arms
    max_generated_tokens: int | None = None  # stop training once cumulative generated tokens reach this
    steps: StepsConfig | None = None  # step segmentation; null: the benchmark's default
    diagnostics_rows: int = 1000  # testbed only: test rows (a seeded subset) for the trap diagnostics each eval (teacher-forced P(mistake), greedy error classes); 0: off
    reference_k: int = 0  # diagnostics: also locate with mc at this K on independent samples and log gpo/critical_agrees_reference (0: off; its tokens are logged apart, never counted as training rollouts)

    def __post_init__(self) -> None:
        for key in ("prompts_per_round", "samples_per_prompt", "reset_samples", "pairs_per_group", "examples_per_round"):
            check(getattr(self, key) >= 1, f"gpo.{key}", getattr(self, key), ">= 1")
        check(self.max_generated_tokens is None or self.max_generated_tokens > 0, "gpo.max_generated_tokens",
              self.max_generated_tokens, "> 0 or null")
        check(self.diagnostics_rows >= 0, "gpo.diagnostics_rows", self.diagnostics_rows, ">= 0 (0: off)")
        check(self.reference_k >= 0, "gpo.reference_k", self.reference_k, ">= 0 (0: off)")


@dataclass
class RoundData:
    trajectories: list[Trajectory]
    localizations: list[Localization] | None  # None in the baseline arm
    groups: list[Group]
    stats: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)  # raw generation counters (tokens, seconds) that merge across ranks


def _hist(steps: Sequence[int]) -> list[int]:
    """Counts of step positions 0..HIST_BINS-1 (later steps go to the last bin)."""
    out = [0] * HIST_BINS
    for s in steps:
        out[min(s, HIST_BINS - 1)] += 1
    return out


def prompt_groups(trajs: Sequence[Trajectory]) -> list[Group]:
    """Baseline arm: one group per prompt holding its whole trajectories."""
    by_prompt: dict[tuple[int, ...], list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_prompt[tuple(t.prompt_ids)].append(t)
    return [Group(prompt_ids=ts[0].prompt_ids, prefix_ids=[], uid=ts[0].uid, step=0,
                  continuations=[Continuation(ids=t.completion_ids, reward=t.reward, finished=t.finished) for t in ts])
            for ts in by_prompt.values()]


def reset_groups(trajs: Sequence[Trajectory], locs: Sequence[Localization], sampler: PolicySampler,
                 cfg: GPOConfig, reuse_estimation: bool | None = None) -> list[Group]:
    """GPO arm: for each explored trajectory, candidates continuing the prefix before its critical step.
    `reuse_estimation` (default cfg.reuse_estimation) adds the estimator's rollouts from that prefix."""
    reuse = cfg.reuse_estimation if reuse_estimation is None else reuse_estimation
    chosen = [(t, loc) for t, loc in zip(trajs, locs) if loc.critical is not None
              and (cfg.reset_undetermined or loc.status != "undetermined")]
    # New samples start after the estimator's sample indices so they are fresh draws.
    jobs = [Job(t, loc.critical, cfg.reset_samples, offset=len(loc.samples.get(loc.critical, [])))  # type: ignore[arg-type]
            for t, loc in chosen]
    fresh = sampler(jobs)
    groups = []
    for (t, loc), new in zip(chosen, fresh):
        step = int(loc.critical)  # type: ignore[arg-type]
        cands = list(new)
        if reuse:
            cands += loc.samples.get(step, [])
        if cfg.include_original:
            cands.append(Continuation(ids=t.completion_ids[t.prefix_len(step):], reward=t.reward, finished=t.finished))
        groups.append(Group(prompt_ids=t.prompt_ids, prefix_ids=t.completion_ids[: t.prefix_len(step)],
                            continuations=cands, uid=t.uid, step=step))
    return groups


def collect_round(rows: Sequence[dict[str, Any]], sampler: PolicySampler, estimator: Estimator | None,
                  cfg: GPOConfig, seed: int, uid_start: int = 0) -> RoundData:
    """Sample trajectories for `rows` and build this round's candidate groups (GPO or baseline).

    A data-parallel rank passes its share of the round's rows and `uid_start` = the global index of its
    first trajectory, so uids (and the estimators' per-uid randomness) match a one-process run's."""
    engine = sampler.engine
    tok0, t0 = engine.stats.generated_tokens, time.perf_counter()
    trajs = sampler.trajectories(rows, cfg.samples_per_prompt, uid_start=uid_start) if rows else []
    counts: dict[str, Any] = {"traj_tokens": engine.stats.generated_tokens - tok0}
    gpo = cfg.enabled and estimator is not None
    locs: list[Localization] | None = None
    if not gpo:
        groups = prompt_groups(trajs)
    else:
        locs = estimator.locate(trajs, sampler, seed) if trajs else []  # type: ignore[union-attr]
        tok1 = engine.stats.generated_tokens
        # probes drawn at another temperature are not samples of the policy: train only on fresh reset draws
        groups = reset_groups(trajs, locs, sampler, cfg,
                              cfg.reuse_estimation and estimator.cfg.temperature is None)  # type: ignore[union-attr]
        counts["reset_tokens"] = engine.stats.generated_tokens - tok1
    counts["time"] = time.perf_counter() - t0
    counts.update(round_counts(trajs, locs, sampler.benchmark, sampler.tokenizer))
    counts["tokens"] = engine.stats.generated_tokens - tok0
    if gpo and cfg.reference_k:
        counts.update(reference_agreement(trajs, locs, sampler, cfg.reference_k, estimator.cfg.explore, seed))  # type: ignore[arg-type,union-attr]
    data = RoundData(trajs, locs, groups, counts=counts)
    data.stats = round_stats(data, cfg)
    return data


def merge_rounds(parts: Sequence[RoundData], cfg: GPOConfig) -> RoundData:
    """One round from the ranks' shares (in rank order): lists concatenated, counters summed, stats recomputed."""
    if len(parts) == 1:
        return parts[0]
    locs = None if parts[0].localizations is None else [loc for p in parts for loc in p.localizations or []]
    counts: dict[str, Any] = {}
    for p in parts:
        for k, v in p.counts.items():
            if k == "time":  # ranks generate in parallel: the round took as long as the slowest share
                counts[k] = max(counts.get(k, 0.0), v)
            elif not k.startswith("gpo/critical_agrees"):
                counts[k] = counts.get(k, 0) + v
    data = RoundData([t for p in parts for t in p.trajectories], locs, [g for p in parts for g in p.groups],
                     counts=counts)
    data.stats = round_stats(data, cfg)
    return data


def round_stats(data: RoundData, cfg: GPOConfig) -> dict[str, Any]:
    """The round's logged statistics, from its trajectories, localizations and generation counters."""
    trajs, locs, c = data.trajectories, data.localizations, data.counts
    stats: dict[str, Any] = {
        "rollout/trajectories": len(trajs),
        "rollout/train_accuracy": sum(t.reward for t in trajs) / max(1, len(trajs)),
        "rollout/mean_steps": sum(t.n_steps for t in trajs) / max(1, len(trajs)),
        "rollout/trajectory_tokens": c["traj_tokens"],
        "rollout/truncated": sum(not t.finished for t in trajs),  # cut off by max_new_tokens: reward 0
        "rollout/truncated_fraction": sum(not t.finished for t in trajs) / max(1, len(trajs)),
    }
    if locs is not None:
        explored = [loc for loc in locs if loc.status != "skipped"]
        agree = agreement(locs, trajs)
        counts = status_counts(locs)
        stats.update({
            "gpo/explored": len(explored),
            "gpo/undetermined": counts.get("undetermined", 0),
            "gpo/trivial": counts.get("trivial", 0),
            "gpo/critical_step_hist": critical_step_hist(explored, HIST_BINS),
            "gpo/first_error_hist": _hist([t.first_error for t in trajs if t.first_error is not None]),
            "gpo/critical_agrees_first_error": agree["agreement"],
            "gpo/agreement_n": agree["n"],
            "gpo/agreement_hits": agree["hits"],
            "gpo/rollouts_per_trajectory": sum(loc.rollouts for loc in explored) / max(1, len(explored)),
            "gpo/rollout_tokens_per_trajectory": sum(loc.tokens for loc in explored) / max(1, len(explored)),
            "gpo/estimation_tokens": sum(loc.tokens for loc in explored),
            "gpo/reset_tokens": c["reset_tokens"],
            "gpo/reset_groups": len(data.groups),
            "gpo/estimation_truncated": sum(not c.finished for loc in explored for cs in loc.samples.values()
                                            for c in cs if c.drawn),
            "gpo/candidates_truncated": sum(not c.finished for g in data.groups for c in g.continuations),  # of the reset groups' candidates
        })
    stats.update(round_diagnostics(c))
    stats["time/rollout_s"] = c["time"]
    stats["rollout/round_generated_tokens"] = c["tokens"]
    if "gpo/reference_n" in c:
        stats.update({k: v for k, v in c.items() if k.startswith("gpo/reference")})
        if c["gpo/reference_n"]:
            stats["gpo/critical_agrees_reference"] = c["gpo/reference_hits"] / c["gpo/reference_n"]
    return stats


def reference_agreement(trajs: Sequence[Trajectory], locs: Sequence[Localization], sampler: PolicySampler,
                        k: int, explore: str, seed: int) -> dict[str, Any]:
    """How often the estimator's critical step equals that of the paper's mc at K=k (random tie-breaks).

    The reference draws its own samples (another sampling seed) so it shares no draws with the
    estimator; it runs on the trajectories the estimator explored (trivial ones excluded).
    """
    picked = [(t, loc) for t, loc in zip(trajs, locs) if loc.status not in ("skipped", "trivial")]
    if not picked:
        return {"gpo/reference_hits": 0, "gpo/reference_n": 0, "gpo/reference_tokens": 0}
    ref = ESTIMATORS.build({"name": "mc", "k": k, "reuse_siblings": False, "tie_break": "random", "explore": explore})
    tok0, old_seed = sampler.engine.stats.generated_tokens, sampler.seed
    sampler.seed = old_seed + 10_000  # independent draws
    try:
        ref_locs = ref.locate([t for t, _ in picked], sampler, seed + 10_000)
    finally:
        sampler.seed = old_seed
    hits = sum(loc.critical == r.critical for (_, loc), r in zip(picked, ref_locs))
    return {"gpo/reference_hits": hits, "gpo/reference_n": len(picked),
            "gpo/critical_agrees_reference": hits / len(picked),
            "gpo/reference_tokens": sampler.engine.stats.generated_tokens - tok0}
