"""Testbed diagnostics: what the policy does at the planted pivotal step (rows with `pivots`).

Less noisy than accuracy, and they say *why* accuracy moves:

- diag/p_mistake: P(planted token | gold prefix) at each test row's first trap step, teacher-forced
  (one forward pass per row, no sampling), mean over rows; diag/p_mistake_gt_half: share above 0.5
  (where greedy decoding takes the trap).
- diag/fail_<class>: share of failed completions whose first error is the trap, collateral (the
  planted kind of mistake at a non-trap step, e.g. `+x` written as `-x`) or other (capacity);
  diag/collateral_rate: collateral first errors as a share of *all* completions.
- gpo/critical_is_pivot: on failed trajectories whose first error is the trap, how often the
  critical step is the planted pivot (hits / n logged per round, pooled in summary.json).

Eval-side numbers (greedy on test rows) are prefixed eval/diag/ (so summary.json gets _before and
_after); the round's sampled training trajectories give rollout/diag/*.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any, Sequence

import torch

from gpo_exp.rollout.steps import split_steps, step_texts
from gpo_exp.rollout.types import Localization, Trajectory

CLASSES = ("trap", "collateral", "other")
DIAG_SEED = 4242  # the seeded subset of test rows the eval diagnostics use (same in every run)


def has_pivots(rows: Sequence[dict[str, Any]], benchmark: Any) -> bool:
    """Diagnostics apply when rows record a planted pivot and the benchmark classifies errors."""
    return bool(rows) and "pivots" in rows[0] and hasattr(benchmark, "error_class")


def diag_rows(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """A seeded subset of n rows (all when n >= len(rows)), in their original order."""
    if n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(DIAG_SEED).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def class_shares(classes: Sequence[str], prefix: str) -> dict[str, float]:
    """Share of failures (class != none) per error class, and collateral over all completions."""
    count = Counter(classes)
    failed = sum(count[c] for c in CLASSES)
    out = {f"{prefix}fail_{c}": (count[c] / failed if failed else 0.0) for c in CLASSES}
    out[f"{prefix}collateral_rate"] = count["collateral"] / len(classes) if classes else 0.0
    out[f"{prefix}failures"] = failed
    return out


def trajectory_classes(trajs: Sequence[Trajectory], benchmark: Any, tokenizer: Any) -> list[str]:
    """Error class of each trajectory (none for a correct one)."""
    return [failure_class(benchmark, step_texts(t.completion_ids, t.step_ends, tokenizer), t.row) if t.reward <= 0
            else "none" for t in trajs]


def failure_class(benchmark: Any, steps: Sequence[str], row: dict[str, Any]) -> str:
    """Error class of a failed completion; one without a located error (cut off, no answer) is other."""
    c = benchmark.error_class(steps, row) if steps else "other"
    return "other" if c == "none" else c


def pivot_agreement(trajs: Sequence[Trajectory], locs: Sequence[Localization], classes: Sequence[str]
                    ) -> tuple[int, int]:
    """(hits, n): failed trajectories whose first error is the trap, and how many have critical == pivot."""
    pairs = [(t, loc) for t, loc, c in zip(trajs, locs, classes, strict=True) if c == "trap" and t.reward <= 0
             and loc.status != "skipped"]  # trajectories left unlocalised (gpo.max_token_ratio) are not misses
    return sum(loc.critical == t.first_error for t, loc in pairs), len(pairs)


def round_counts(trajs: Sequence[Trajectory], locs: Sequence[Localization] | None, benchmark: Any,
                 tokenizer: Any) -> dict[str, int]:
    """Summable per-round counters (so data-parallel shares merge by addition): trajectories per error
    class and, with GPO, pivot hits / n. Empty unless the rows record a planted pivot."""
    if not has_pivots([t.row for t in trajs], benchmark):
        return {}
    classes = trajectory_classes(trajs, benchmark, tokenizer)
    count = Counter(classes)
    out = {f"diag_n/{c}": count[c] for c in (*CLASSES, "none")}
    if locs is not None:
        out["gpo/pivot_hits"], out["gpo/pivot_n"] = pivot_agreement(trajs, locs, classes)
    return out


def round_diagnostics(counts: dict[str, Any]) -> dict[str, Any]:
    """Error-class shares of the round's sampled trajectories and, with GPO, agreement with the pivot,
    from `round_counts`' counters."""
    if "diag_n/none" not in counts:
        return {}
    classes = [c for c in (*CLASSES, "none") for _ in range(int(counts[f"diag_n/{c}"]))]
    out: dict[str, Any] = class_shares(classes, "rollout/diag/")
    if "gpo/pivot_n" in counts:
        hits, n = int(counts["gpo/pivot_hits"]), int(counts["gpo/pivot_n"])
        out.update({"gpo/pivot_hits": hits, "gpo/pivot_n": n,
                    "gpo/critical_is_pivot": hits / n if n else float("nan")})
    return out


def mistake_pairs(tokenizer: Any, prompts: Sequence[list[int]], rows: Sequence[dict[str, Any]]
                  ) -> list[tuple[list[int], int]]:
    """(context ids, planted token id) per row: the gold prefix up to the first token where the
    planted line leaves the gold line at the row's first pivot."""
    out = []
    for prompt, row in zip(prompts, rows):
        p = row["pivots"][0]
        head = "".join(line + "\n" for line in row["lines"][:p])
        gold = tokenizer(head + row["lines"][p], add_special_tokens=False).input_ids
        bad = tokenizer(head + row["trap_lines"][0], add_special_tokens=False).input_ids
        j = next(i for i, (a, b) in enumerate(zip(gold, bad)) if a != b)
        out.append((list(prompt) + gold[:j], bad[j]))
    return out


@torch.no_grad()
def mistake_probs(model: Any, pairs: Sequence[tuple[list[int], int]], pad_id: int, batch: int = 256) -> list[float]:
    """P(token | context) under the model for each (context, token) pair (right-padded batches)."""
    out: list[float] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(pairs), batch):
            chunk = pairs[s:s + batch]
            width = max(len(c) for c, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (c, _) in enumerate(chunk):
                ids[i, :len(c)] = torch.tensor(c)
                mask[i, :len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            last = mask.sum(1).to(device) - 1
            logp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last], dim=-1)
            out += logp[torch.arange(len(chunk), device=device),
                        torch.tensor([t for _, t in chunk], device=device)].exp().tolist()
    finally:
        model.train(was_training)
    return out


def eval_diagnostics(sampler: Any, model: Any, rows: Sequence[dict[str, Any]], n: int,
                     seed: int = 12345, greedy: Sequence[Any] | None = None) -> dict[str, Any]:
    """Teacher-forced P(mistake) at the trap and greedy error classes on a seeded subset of test rows.
    `greedy`: the evaluation's greedy generations for `rows` (reused when the subset is all of them)."""
    if n <= 0 or not has_pivots(rows, sampler.benchmark):
        return {}
    reuse = greedy is not None and len(greedy) == len(rows) and n >= len(rows)
    rows = diag_rows(rows, n)
    tok, bench = sampler.tokenizer, sampler.benchmark
    prompts = [sampler.encode(r) for r in rows]
    probs = mistake_probs(model, mistake_pairs(tok, prompts, rows), tok.pad_token_id)
    if not reuse:
        greedy = sampler.engine.generate(prompts, [0] * len(prompts), seed=seed, greedy=True)
    assert greedy is not None
    classes = []
    for g, row in zip(greedy, rows):
        if sampler.reward(g.ids, row, g.finished) > 0:
            classes.append("none")
        else:
            classes.append(failure_class(bench, step_texts(g.ids, split_steps(g.ids, tok, sampler.steps), tok), row))
    out: dict[str, Any] = {"eval/diag/p_mistake": sum(probs) / len(probs),
                           "eval/diag/p_mistake_gt_half": sum(p > 0.5 for p in probs) / len(probs),
                           "eval/diag/rows": len(rows),
                           "eval/diag/greedy_accuracy": classes.count("none") / len(rows),
                           # per-row correctness, for analyses paired over the same test rows (gpo_exp.report)
                           "eval/diag/greedy_correct": "".join("1" if c == "none" else "0" for c in classes)}
    out.update(class_shares(classes, "eval/diag/"))
    return out


def summary_diagnostics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run-level: critical == planted pivot pooled over rounds (other diagnostics get _before/_after)."""
    hits = sum(int(r.get("gpo/pivot_hits", 0)) for r in records)
    n = sum(int(r.get("gpo/pivot_n", 0)) for r in records)
    out: dict[str, Any] = {}
    if any("gpo/pivot_n" in r for r in records):
        out.update({"gpo/critical_is_pivot": hits / n if n else None, "gpo/pivot_n": n})
    with_round = [r for r in records if any(k.startswith("rollout/diag/") for k in r)]
    if with_round:  # the first and the last round's sampled trajectories
        for k in (k for k in with_round[0] if k.startswith("rollout/diag/")):
            out[f"{k}_first"], out[f"{k}_last"] = with_round[0][k], with_round[-1].get(k)
    return out
