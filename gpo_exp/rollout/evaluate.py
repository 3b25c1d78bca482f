"""Accuracy of a policy on benchmark rows: greedy pass@1, sampled pass@1, pass@k and maj@k.

Two protocols (`PROTOCOLS`), each naming its headline metric:
  greedy   greedy pass@1 (`accuracy`), plus the sampled metrics when samples > 0 (tiny, small models);
  sampled  no greedy decoding: pass@1 averaged over `samples` samples per problem at the engine's
           temperature (`sampled_accuracy`), as reasoning models are evaluated (R1's card: T=0.6,
           top-p 0.95; greedy decoding makes them loop).
maj@k votes over the samples' final answers grouped by the benchmark's `same_answer` (math-verify
equivalence for MATH-style benchmarks: \\boxed{\\frac{3}{4}} and \\boxed{0.75} are one vote).
`truncated` is the share of generations the length limit cut off (they score 0).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from gpo_exp.rollout.sampler import PolicySampler

EVAL_SEED = 12345  # fixed: every evaluation of every run draws the same sample indices
PROTOCOLS = {"greedy": "accuracy", "sampled": "sampled_accuracy"}  # protocol -> its headline metric


def headline_metric(protocol: str) -> str:
    """The evaluate() key a protocol reports as its result."""
    return PROTOCOLS[protocol]


def majority(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[int]:
    """Indices of the answers in the largest group of equivalent ones (ties: the group seen first);
    None answers (nothing extractable) vote for nothing; [] when there is no answer at all."""
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same(answers[g[0]], a):  # type: ignore[arg-type]
                g.append(i)
                break
        else:
            groups.append([i])
    return max(groups, key=len) if groups else []  # max keeps the first of equal-sized groups


def evaluate(sampler: PolicySampler, rows: Sequence[dict[str, Any]], samples: int = 4,
             seed: int = EVAL_SEED, greedy: bool = True, greedy_out: list | None = None,
             per_row: list | None = None) -> dict[str, float]:
    """Greedy pass@1 (`accuracy`, when greedy) and with samples > 0 mean sampled accuracy (pass@1 averaged
    over the samples), pass@k and maj@k (k = samples); `truncated`: share of generations cut off.
    `greedy_out` (a list) receives the greedy generations, one per row, for diagnostics that reuse them;
    `per_row` (a list) receives one dict per row with the same metrics for that row alone (means over
    rows give the returned values), for per-group breakdowns and confidence intervals."""
    if not greedy and samples < 1:
        raise ValueError("evaluate: the sampled protocol needs samples >= 1")
    engine, old_seed, bench = sampler.engine, sampler.seed, sampler.benchmark
    sampler.seed = seed
    try:
        prompts = [sampler.encode(r) for r in rows]
        out: dict[str, float] = {}
        cut = total = 0
        if greedy:
            gens = engine.generate(prompts, [0] * len(prompts), seed=seed, greedy=True)
            if greedy_out is not None:
                greedy_out.extend(gens)
            rewards = [sampler.reward(g.ids, r, g.finished) for g, r in zip(gens, rows)]
            out["accuracy"] = sum(rewards) / len(rows)
            cut, total = sum(not g.finished for g in gens), len(gens)
            rows_out = [{"accuracy": x} for x in rewards]
        else:
            rows_out = [{} for _ in rows]
        if samples > 0:
            gens = engine.generate([p for p in prompts for _ in range(samples)],
                                   [j for _ in prompts for j in range(samples)], seed=seed)
            cut, total = cut + sum(not g.finished for g in gens), total + len(gens)
            scores, passes, majs = [], 0, 0
            for i, row in enumerate(rows):
                group = gens[i * samples:(i + 1) * samples]
                texts = [sampler.tokenizer.decode(g.ids, skip_special_tokens=True) for g in group]
                # decode once: score the same texts that are voted on (cut-off completions score 0)
                rs = [float(bench.score(t, row)) if g.finished else 0.0 for t, g in zip(texts, group)]
                scores += rs
                passes += max(rs) > 0
                answers = [bench.final_answer(t) if g.finished else None for t, g in zip(texts, group)]
                maj = max((rs[j] for j in majority(answers, bench.same_answer)), default=0.0) > 0
                majs += maj
                rows_out[i].update({"sampled_accuracy": sum(rs) / samples, f"pass@{samples}": float(max(rs) > 0),
                                    f"maj@{samples}": float(maj)})
            out.update({"sampled_accuracy": sum(scores) / len(scores), f"pass@{samples}": passes / len(rows),
                        f"maj@{samples}": majs / len(rows)})
        out["truncated"] = cut / total
        if per_row is not None:
            per_row.extend(rows_out)
        return out
    finally:
        sampler.seed = old_seed
