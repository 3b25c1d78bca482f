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

import random
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
MIXES = ("augment", "replace", "substitute")
REUSES = ("critical", "tree")
FIRST_CHUNK = 4  # under a token budget: trajectories localised by the first estimator call (measures the cost per trajectory)
MAX_CHUNK = 32  # most trajectories per later call (each sized to the budget left at the mean cost so far)


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
    mix: str = "augment"  # augment: the prompt's fresh groups plus the reset groups | replace: reset groups only (ablation) | substitute: each failed fresh trajectory replaced by its prefix + one continuation from the reset point (the authors' prototype)
    reuse: str = "critical"  # critical: only the estimator's draws at the critical prefix join its reset group (reuse_estimation) | tree: every other estimated prefix whose draws' outcomes differ becomes a group there too
    tree_prefixes: int = 2  # tree: most prefixes per trajectory made into groups (a seeded subset of those with mixed outcomes), so no trajectory dominates
    tree_group_size: int = 8  # tree: most continuations in one prefix's group (the trajectory's own + a seeded subset of the draws), so no prefix dominates
    reset_examples: int | None = None  # cap on examples from reset groups per round (augment: beside the fresh groups' examples_per_round); null: examples_per_round
    tree_examples: int | None = None  # cap on examples from tree groups per round; null: examples_per_round
    max_token_ratio: float | None = 2.0  # a round generates about at most this multiple of its fresh trajectories' tokens: trajectories are localised and reset in a seeded order (one per prompt first) until the budget is spent; null: every one (the paper)
    diagnostics_rows: int = 1000  # testbed only: test rows (a seeded subset) for the trap diagnostics each eval (teacher-forced P(mistake), greedy error classes); 0: off
    reference_k: int = 0  # diagnostics: also locate with mc at this K on independent samples and log gpo/critical_agrees_reference (0: off; its tokens are logged apart, never counted as training rollouts)

    def __post_init__(self) -> None:
        for key in ("prompts_per_round", "samples_per_prompt", "reset_samples", "pairs_per_group", "examples_per_round"):
            check(getattr(self, key) >= 1, f"gpo.{key}", getattr(self, key), ">= 1")
        check(self.max_generated_tokens is None or self.max_generated_tokens > 0, "gpo.max_generated_tokens",
              self.max_generated_tokens, "> 0 or null")
        check(self.mix in MIXES, "gpo.mix", self.mix, " | ".join(MIXES))
        check(self.reuse in REUSES, "gpo.reuse", self.reuse, " | ".join(REUSES))
        check(self.tree_prefixes >= 1, "gpo.tree_prefixes", self.tree_prefixes, ">= 1")
        check(self.tree_group_size >= 2, "gpo.tree_group_size", self.tree_group_size, ">= 2 (a group needs two outcomes)")
        for key in ("reset_examples", "tree_examples"):
            check(getattr(self, key) is None or getattr(self, key) >= 1, f"gpo.{key}", getattr(self, key), ">= 1 or null")
        check(self.max_token_ratio is None or self.max_token_ratio > 1, "gpo.max_token_ratio", self.max_token_ratio,
              "> 1 or null (1 would leave no tokens to localise with)")
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


def check_gpo(cfg: GPOConfig, estimator: Estimator | None) -> None:
    """Settings that need the estimator: refused at start with one line (ConfigError)."""
    if not cfg.enabled or estimator is None or cfg.reuse != "tree":
        return
    check(estimator.draws_rollouts, "gpo.reuse", cfg.reuse,
          f"critical with estimator={estimator.cfg.name}, which draws no rollouts to reuse (tree needs mc, bisect or adaptive)")
    check(estimator.cfg.temperature is None, "gpo.reuse", cfg.reuse,
          f"critical with estimator.temperature={estimator.cfg.temperature} (tree trains on the draws: they must be the policy's)")


def reset_groups(trajs: Sequence[Trajectory], locs: Sequence[Localization], sampler: PolicySampler,
                 cfg: GPOConfig, reuse_estimation: bool | None = None, n: int | None = None) -> list[Group]:
    """GPO arm: for each explored trajectory, candidates continuing the prefix before its critical step.
    `reuse_estimation` (default cfg.reuse_estimation) adds the estimator's rollouts from that prefix;
    `n` fresh draws per prefix (default cfg.reset_samples)."""
    reuse = cfg.reuse_estimation if reuse_estimation is None else reuse_estimation
    chosen = [(t, loc) for t, loc in zip(trajs, locs) if loc.critical is not None
              and (cfg.reset_undetermined or loc.status != "undetermined")]
    # New samples start after the estimator's sample indices so they are fresh draws.
    jobs = [Job(t, loc.critical, n or cfg.reset_samples, offset=len(loc.samples.get(loc.critical, [])))  # type: ignore[arg-type]
            for t, loc in chosen]
    fresh = sampler(jobs) if jobs else []
    groups = []
    for (t, loc), new in zip(chosen, fresh):
        step = int(loc.critical)  # type: ignore[arg-type]
        cands = list(new)
        if reuse:
            cands += loc.samples.get(step, [])
        if cfg.include_original:
            cands.append(Continuation(ids=t.completion_ids[t.prefix_len(step):], reward=t.reward, finished=t.finished))
        groups.append(Group(prompt_ids=t.prompt_ids, prefix_ids=t.completion_ids[: t.prefix_len(step)],
                            continuations=cands, uid=t.uid, step=step, source="reset"))
    return groups


def substitute(fresh: Sequence[Group], trajs: Sequence[Trajectory], resets: Sequence[Group]) -> list[Group]:
    """mix=substitute: in each prompt group, a failed trajectory that was reset is replaced by its prefix
    plus the first fresh continuation drawn there (its prefix tokens `frozen`: not trained)."""
    by_uid = {g.uid: g for g in resets}
    out = []
    for g in fresh:
        members = [t for t in trajs if t.prompt_ids == g.prompt_ids]
        conts = []
        for t, c in zip(members, g.continuations):
            r = by_uid.get(t.uid)
            if r is not None and t.reward <= 0:
                new = r.continuations[0]
                c = Continuation(ids=r.prefix_ids + new.ids, reward=new.reward, finished=new.finished,
                                 frozen=len(r.prefix_ids))
            conts.append(c)
        out.append(Group(prompt_ids=g.prompt_ids, prefix_ids=[], continuations=conts, uid=g.uid, step=0))
    return out


def tree_groups(trajs: Sequence[Trajectory], locs: Sequence[Localization], cfg: GPOConfig, seed: int,
                skip_critical: bool) -> list[Group]:
    """gpo.reuse=tree: the estimator's draws at each estimated prefix, with the trajectory's own
    continuation from there, as a group at that prefix; only prefixes whose outcomes differ (a group
    with one outcome has no pair and no GRPO advantage), at most `tree_prefixes` per trajectory and
    `tree_group_size` continuations per group (seeded subsets), so no trajectory or prefix dominates.
    `skip_critical`: the critical prefix's draws are already in its reset group."""
    out = []
    seen: set[tuple] = set()  # siblings sharing a prefix see the same draws there (shared, or deduplicated): one group
    for t, loc in zip(trajs, locs):
        if loc.status == "skipped":
            continue
        rng = random.Random(seed * 1_000_003 + t.uid)
        cands = []
        for i, conts in sorted(loc.samples.items()):
            drawn = [c for c in conts if c.drawn]  # sibling trajectories are already in the fresh groups
            key = (tuple(t.prefix_ids(i)), tuple(tuple(c.ids) for c in drawn))
            if not drawn or (skip_critical and i == loc.critical) or key in seen:
                continue
            own = Continuation(ids=t.completion_ids[t.prefix_len(i):], reward=t.reward, finished=t.finished)
            members = [own, *drawn]
            if len({c.reward > 0.5 for c in members}) < 2:
                continue
            cands.append((i, members, key))
        for i, members, key in sorted(rng.sample(cands, min(cfg.tree_prefixes, len(cands))), key=lambda x: x[0]):
            seen.add(key)
            if len(members) > cfg.tree_group_size:
                members = [members[0], *rng.sample(members[1:], cfg.tree_group_size - 1)]
            out.append(Group(prompt_ids=t.prompt_ids, prefix_ids=t.completion_ids[: t.prefix_len(i)],
                             continuations=members, uid=t.uid, step=i, source="tree"))
    return out


def localisation_order(trajs: Sequence[Trajectory], explore: str, seed: int) -> list[int]:
    """Indices of the trajectories to localise, in a seeded order that takes one per prompt first
    (then a second per prompt, ...), so a token budget spreads over the round's prompts."""
    idx = [i for i, t in enumerate(trajs) if explore == "all" or t.reward <= 0]
    random.Random(seed).shuffle(idx)
    seen: dict[tuple[int, ...], int] = defaultdict(int)
    rank = {}
    for i in idx:
        key = tuple(trajs[i].prompt_ids)
        rank[i] = seen[key]
        seen[key] += 1
    return sorted(idx, key=lambda i: rank[i])  # stable: the shuffled order within each rank


def localise(trajs: Sequence[Trajectory], sampler: PolicySampler, estimator: Estimator, cfg: GPOConfig,
             seed: int, budget: float | None, reuse: bool, n_reset: int | None
             ) -> tuple[list[Localization], list[Group], int]:
    """Locate critical steps and sample at their reset prefixes: (localisations, reset groups, reset tokens).

    Without a budget every trajectory the estimator explores is localised in one call. With one,
    trajectories go in `localisation_order`, in chunks (estimation, then reset): FIRST_CHUNK, then as many
    as the budget left affords at the mean cost per trajectory so far (at most MAX_CHUNK), until not one
    more does; the rest are "skipped". Every trajectory still lends its tokens to the estimator as a
    sibling sample."""
    stats = sampler.engine.stats
    if budget is None:
        locs = estimator.locate(list(trajs), sampler, seed)
        tok = stats.generated_tokens
        groups = reset_groups(trajs, locs, sampler, cfg, reuse, n_reset)
        return locs, groups, stats.generated_tokens - tok
    order = localisation_order(trajs, estimator.cfg.explore, seed)
    found: dict[int, Localization] = {}
    groups: list[Group] = []
    spent = reset_tokens = done = 0
    i = 0
    while i < len(order):
        n = FIRST_CHUNK if done == 0 else MAX_CHUNK if spent == 0 else min(MAX_CHUNK, int((budget - spent) // (spent / done)))
        if n <= 0 or spent >= budget:
            break
        chunk = order[i: i + n]
        i += n
        tok0 = stats.generated_tokens
        part = estimator.locate(list(trajs), sampler, seed, only={trajs[j].uid for j in chunk})
        tok1 = stats.generated_tokens
        groups += reset_groups([trajs[j] for j in chunk], [part[j] for j in chunk], sampler, cfg, reuse, n_reset)
        reset_tokens += stats.generated_tokens - tok1
        spent += stats.generated_tokens - tok0
        done += len(chunk)
        found.update({j: part[j] for j in chunk})
    skipped = lambda t: Localization(values=[None] * (t.n_steps + 1), advantages=[None] * t.n_steps,  # noqa: E731
                                     critical=None, status="skipped")
    return [found.get(j) or skipped(t) for j, t in enumerate(trajs)], groups, reset_tokens


def collect_round(rows: Sequence[dict[str, Any]], sampler: PolicySampler, estimator: Estimator | None,
                  cfg: GPOConfig, seed: int, uid_start: int = 0) -> RoundData:
    """Sample trajectories for `rows` and build this round's candidate groups (GPO or baseline).

    GPO's groups by `cfg.mix`: the prompt groups (source fresh) plus the reset groups (augment), the reset
    groups alone (replace), or the prompt groups with failed trajectories substituted (substitute); with
    `cfg.reuse=tree`, plus the estimator's draws at other prefixes (source tree).

    A data-parallel rank passes its share of the round's rows and `uid_start` = the global index of its
    first trajectory, so uids (and the estimators' per-uid randomness) match a one-process run's."""
    engine = sampler.engine
    tok0, t0 = engine.stats.generated_tokens, time.perf_counter()
    trajs = sampler.trajectories(rows, cfg.samples_per_prompt, uid_start=uid_start) if rows else []
    counts: dict[str, Any] = {"traj_tokens": engine.stats.generated_tokens - tok0}
    gpo = cfg.enabled and estimator is not None
    locs: list[Localization] | None = None
    fresh = prompt_groups(trajs)
    if not gpo:
        groups = fresh
    else:
        assert estimator is not None
        budget = None if cfg.max_token_ratio is None else (cfg.max_token_ratio - 1) * counts["traj_tokens"]
        # probes drawn at another temperature are not samples of the policy: train only on fresh reset draws
        policy_draws = estimator.cfg.temperature is None
        locs, resets, counts["reset_tokens"] = localise(
            trajs, sampler, estimator, cfg, seed, budget, cfg.reuse_estimation and policy_draws,
            1 if cfg.mix == "substitute" else None) if trajs else ([], [], 0)
        counts["reset_prefixes"] = len(resets)
        if cfg.mix == "augment":
            groups = fresh + resets
        elif cfg.mix == "replace":
            groups = resets
        else:
            groups = substitute(fresh, trajs, resets)
        if cfg.reuse == "tree" and policy_draws:
            groups += tree_groups(trajs, locs, cfg, seed, skip_critical=cfg.mix != "substitute"
                                  and cfg.reuse_estimation)
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
            "gpo/reset_groups": c["reset_prefixes"],  # prefixes sampled at (substitute: failed trajectories replaced)
            "gpo/tree_groups": sum(g.source == "tree" for g in data.groups),
            "gpo/unlocalised_failed": sum(loc.status == "skipped" and t.reward <= 0 for loc, t in zip(locs, trajs)),  # left by the token budget
            "gpo/estimation_truncated": sum(not c.finished for loc in explored for cs in loc.samples.values()
                                            for c in cs if c.drawn),
            "gpo/candidates_truncated": sum(not c.finished for g in data.groups if g.source == "reset"
                                            for c in g.continuations),  # of the reset groups' candidates
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
