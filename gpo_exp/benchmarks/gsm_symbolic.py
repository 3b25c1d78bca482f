"""`gsm_symbolic`: GSM8K-derived word problems regenerated offline by reasoning-gym.

reasoning-gym's `gsm_symbolic` instantiates ~85 GSM8K templates with fresh names and numbers; each
item carries the question, the integer answer and a worked solution in GSM8K format (one step
per line, then `#### N`). Item i depends only on (seed, i), so we draw one seeded stream, drop
repeated questions, and cut it test-first: test, then val, then train. Growing `sizes.train`
therefore never changes the val/test problems, and no question appears in two splits.
reasoning-gym seeds item i with seed + i, so seeds 0 and 1 would give one stream shifted by one
item; we pass seed * _SEED_STRIDE so different `benchmark.seed` values give unrelated problems.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from gpo_exp.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkConfig, StepsConfig
from gpo_exp.benchmarks.graders import (extract_boxed, extract_gsm8k, grade_number, number_str, score_gsm8k,
                                        to_number)
from gpo_exp.benchmarks.hub import GSM_TEMPLATE
from gpo_exp.registry import check

# reasoning-gym appends this to every question; our prompt states the answer format itself.
_SUFFIX = " Give the result as your final answer. Do not include units."
_SEED_STRIDE = 1_000_003
_FINAL_LINE = re.compile(r"####[^\n]*\s*$")


@dataclass
class GsmSymbolicConfig(BenchmarkConfig):
    name: str = "gsm_symbolic"  # registry name
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 100, "test": 300})  # rows per split
    max_new_tokens: int = 320  # gold solutions are < 200 tokens; leave room for wordier models
    steps: StepsConfig = field(  # one step per line; blank lines and short lines are merged
        default_factory=lambda: StepsConfig(delimiters=["\n\n", "\n"], min_tokens=4, max_steps=30))

    def __post_init__(self) -> None:
        check(set(self.sizes) <= {"train", "val", "test"} and all(v >= 0 for v in self.sizes.values()),
              "benchmark.sizes", self.sizes, "non-negative counts for train/val/test")


def _items(seed: int, start_size: int) -> Iterator[dict[str, Any]]:
    """reasoning-gym items 0, 1, 2, ... for `seed` (the template choice list is prefix-stable in size)."""
    import reasoning_gym  # lazy: only this benchmark needs it

    start, size = 0, max(start_size, 1)
    while True:  # ran short (duplicates): rebuild larger; items start..size-1 are new
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        for i in range(start, size):
            yield ds[i]
        start, size = size, 2 * size


def to_row(item: dict[str, Any]) -> dict[str, Any]:
    """A reasoning-gym item as a benchmark row; the solution's last line is made '#### <answer>'."""
    question = str(item.get("question", ""))
    question = question[: -len(_SUFFIX)] if question.endswith(_SUFFIX) else question
    answer = item.get("answer")
    x = to_number(answer)
    answer = number_str(x) if x is not None else None  # None: the base skips and counts the row
    solution = str(item.get("metadata", {}).get("answer_cot", "")).strip()
    solution = _FINAL_LINE.sub(f"#### {answer}", solution)  # '#### 69.0' -> '#### 69'
    return {"prompt": question, "answer": answer, "solution": solution,
            "index": item.get("metadata", {}).get("source_index")}


@BENCHMARKS.register("gsm_symbolic", GsmSymbolicConfig)
class GsmSymbolic(Benchmark):
    name = "gsm_symbolic"
    cfg: GsmSymbolicConfig

    def _load(self, split: str) -> list[dict[str, Any]]:
        sizes = self.cfg.sizes
        need = {s: sizes.get(s, 0) for s in ("test", "val", "train")}
        order = [s for s in ("test", "val", "train") if need[s] > 0 or s == split]
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in order}
        seen: set[str] = set()
        items = _items(self.cfg.seed * _SEED_STRIDE, sum(need.values()) + 16)
        for s in order:  # eval splits first so train never leaks into them
            while len(out[s]) < need[s]:
                row = to_row(next(items))
                if row["prompt"] not in seen:  # a few template instances repeat (~0.5%)
                    seen.add(row["prompt"])
                    out[s].append(row)
            if s == split:
                break
        return out[split]

    def prompt(self, row: dict[str, Any]) -> str:
        return GSM_TEMPLATE.format(question=row["prompt"])

    def score(self, completion: str, row: dict[str, Any]) -> float:
        """1.0 when the '#### N' (or 'answer is N', or \\boxed{N}) number equals the gold answer."""
        return score_gsm8k(completion, row["answer"])

    def final_answer(self, completion: str) -> str | None:
        """The number score_gsm8k grades (maj@k votes on it)."""
        return extract_gsm8k(completion) or extract_boxed(completion)

    def same_answer(self, a: str, b: str) -> bool:
        return grade_number(a, b)
