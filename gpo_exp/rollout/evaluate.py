"""Accuracy of a policy on benchmark rows: greedy pass@1, sampled accuracy, pass@k and maj@k."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from gpo_exp.rollout.sampler import PolicySampler

EVAL_SEED = 12345  # fixed: every evaluation of every run draws the same sample indices


def _final_answer(text: str) -> str:
    """A normalised final answer for majority voting: the last number in the completion (or its tail)."""
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else text.strip()[-40:]


def evaluate(sampler: PolicySampler, rows: Sequence[dict[str, Any]], samples: int = 4,
             seed: int = EVAL_SEED) -> dict[str, float]:
    """Greedy pass@1 on every row; with samples > 0 also mean sampled accuracy, pass@k and maj@k (k = samples)."""
    engine, old_seed = sampler.engine, sampler.seed
    sampler.seed = seed
    try:
        prompts = [sampler.encode(r) for r in rows]
        greedy = engine.generate(prompts, [0] * len(prompts), seed=seed, greedy=True)
        out = {"accuracy": sum(sampler.reward(g.ids, r, g.finished) for g, r in zip(greedy, rows)) / len(rows)}
        if samples > 0:
            gens = engine.generate([p for p in prompts for _ in range(samples)],
                                   [j for _ in prompts for j in range(samples)], seed=seed)
            scores, passes, majs = [], 0, 0
            for i, row in enumerate(rows):
                group = gens[i * samples:(i + 1) * samples]
                texts = [sampler.tokenizer.decode(g.ids, skip_special_tokens=True) for g in group]
                # decode once: score the same texts that are voted on (cut-off completions score 0)
                rs = [float(sampler.benchmark.score(t, row)) if g.finished else 0.0 for t, g in zip(texts, group)]
                scores += rs
                passes += max(rs) > 0
                vote = Counter(_final_answer(t) for t in texts).most_common(1)[0][0]
                majs += max((r for t, r in zip(texts, rs) if _final_answer(t) == vote), default=0.0) > 0
            out.update({"sampled_accuracy": sum(scores) / len(scores), f"pass@{samples}": passes / len(rows),
                        f"maj@{samples}": majs / len(rows)})
        return out
    finally:
        sampler.seed = old_seed
