"""`arith`: generated multi-step arithmetic chains with a ground-truth step checker.

A problem is a chain of operations applied left to right to a running value:

    Q: 7,+5,-3,*4,+8
    7+5=12
    12-3=9
    9*4=36
    36+8=44
    Answer: 44

Every line depends on the previous line's result, so a wrong line makes the final answer wrong
(the value is exactly 0 after the first error), and `first_wrong_step` knows where it went wrong.
The easy steps (+/- with one-digit operands) come first and the hard step (a multiplication) is
placed at position >= `mul_from`, so most failures happen after line 0 and GPO's reset is exercised.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from gpo_exp.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkConfig, StepsConfig
from gpo_exp.registry import check

_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


@dataclass
class ArithConfig(BenchmarkConfig):
    name: str = "arith"  # registry name
    n_ops: list[int] = field(default_factory=lambda: [3, 4])  # [min, max] operations per problem
    operand_max: int = 9  # +/- operands are drawn from 1..operand_max
    start_max: int = 20  # the starting value is drawn from 1..start_max
    mul_max: int = 6  # multiplier of the hard step, drawn from 2..mul_max
    n_mul: int = 1  # number of hard (multiplication) steps per problem
    mul_from: int = 1  # earliest line index of a hard step (0 = may be the first line)
    value_max: int = 99  # running values stay in 0..value_max (operations are redrawn otherwise)
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 20000, "val": 200, "test": 300})  # rows per split
    max_new_tokens: int = 64  # a solution is at most ~50 characters
    steps: StepsConfig = field(default_factory=lambda: StepsConfig(delimiters=["\n"], min_tokens=1, max_steps=30))

    def __post_init__(self) -> None:
        check(len(self.n_ops) == 2 and 1 <= self.n_ops[0] <= self.n_ops[1], "benchmark.n_ops", self.n_ops,
              "[min, max] with 1 <= min <= max")
        check(self.operand_max >= 1 and self.start_max >= 1, "benchmark.operand_max/start_max",
              (self.operand_max, self.start_max), ">= 1")
        check(self.mul_max >= 2, "benchmark.mul_max", self.mul_max, ">= 2")
        check(0 <= self.n_mul <= self.n_ops[0], "benchmark.n_mul", self.n_mul, f"in 0..n_ops[0]={self.n_ops[0]}")
        check(0 <= self.mul_from < self.n_ops[0], "benchmark.mul_from", self.mul_from, f"in 0..{self.n_ops[0] - 1}")
        check(self.value_max >= self.start_max, "benchmark.value_max", self.value_max, ">= start_max")
        check(set(self.sizes) <= {"train", "val", "test"} and all(v >= 0 for v in self.sizes.values()),
              "benchmark.sizes", self.sizes, "non-negative counts for train/val/test")


def _apply(value: int, op: str, x: int) -> int:
    return value + x if op == "+" else value - x if op == "-" else value * x


def make_problem(rng: random.Random, cfg: ArithConfig) -> dict[str, Any]:
    """One problem: prompt, gold solution lines, answer."""
    n = rng.randint(cfg.n_ops[0], cfg.n_ops[1])
    mul_at = set(rng.sample(range(cfg.mul_from, n), cfg.n_mul))
    start = value = rng.randint(1, cfg.start_max)
    ops, lines = [], []
    for i in range(n):
        for _ in range(100):  # redraw until the running value stays in range
            if i in mul_at:
                op, x = "*", rng.randint(2, cfg.mul_max)
            else:
                op, x = rng.choice("+-"), rng.randint(1, cfg.operand_max)
            new = _apply(value, op, x)
            if 0 <= new <= cfg.value_max:
                break
        else:  # nothing fits (e.g. a large value times 2): fall back to subtracting 1
            op, x, new = "-", 1, value - 1
        ops.append(f"{op}{x}")
        lines.append(f"{value}{op}{x}={new}")
        value = new
    prompt = f"Q: {start}," + ",".join(ops)
    return {"prompt": prompt, "answer": str(value), "lines": lines + [f"Answer: {value}"],
            "solution": "\n".join(lines + [f"Answer: {value}"])}


@BENCHMARKS.register("arith", ArithConfig)
class Arith(Benchmark):
    name = "arith"
    cfg: ArithConfig

    def _load(self, split: str) -> list[dict[str, Any]]:
        # Disjoint splits: a problem's prompt belongs to the first split that generated it.
        seen: set[str] = set()
        out: dict[str, list[dict[str, Any]]] = {}
        for s in ("test", "val", "train"):  # eval splits first so train never leaks into them
            rng = random.Random(self.cfg.seed * 1000 + _SPLIT_OFFSET[s])
            rows: list[dict[str, Any]] = []
            tries = 0
            while len(rows) < self.cfg.sizes.get(s, 0) and tries < 20 * self.cfg.sizes.get(s, 0) + 100:
                tries += 1
                row = make_problem(rng, self.cfg)
                if row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    rows.append(row)
            out[s] = rows
            if s == split:
                return rows
        return out[split]

    def prompt(self, row: dict[str, Any]) -> str:
        return row["prompt"] + "\n"

    def score(self, completion: str, row: dict[str, Any]) -> float:
        found = _ANSWER.findall(completion)
        return float(bool(found) and found[-1] == str(row["answer"]))

    def first_wrong_step(self, steps: Sequence[str], row: dict[str, Any]) -> int | None:
        """First step whose line differs from the gold line (the gold chain is unique).

        Returns None when every step is right, or when the completion stops before its first error.
        """
        gold = row["lines"]
        for i, step in enumerate(steps):
            if i >= len(gold) or step.strip() != gold[i]:
                return i
        return None
