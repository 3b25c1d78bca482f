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

The noisy-teacher testbed (`trap: sign | mul`) plants a pivotal step in every chain. A problem gets
exactly `traps_per_chain` trap steps at lines >= `trap_from` (sign: the only `-` steps there, all
other +/- steps there are `+`; mul: the `*` steps). On the train split the teacher's worked solution
makes the planted mistake at each trap step with probability `trap_p` (sign: `12-3` written and
computed as `12+3=15`; mul: `9*4` as `9*5=45`) and continues consistently from its wrong value.
Prompts, answers and the gold `lines` of the step checker stay correct, and every row records its
trap lines (`pivots`) and the planted line given the gold prefix (`trap_lines`), so a first error
can be classified as the planted one (`error_class`).
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from gpo_exp.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkConfig, StepsConfig
from gpo_exp.registry import check

_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}
TRAPS = ("none", "sign", "mul")
TRAP_FIELDS = ("trap", "trap_p", "trap_from", "traps_per_chain")  # only in the warm-start key when trap != none
_TEACHER_OFFSET = 7  # the teacher's coin flips have their own stream: trap_p never changes the problems


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
    steps: StepsConfig = field(default_factory=lambda: StepsConfig(delimiters=["\n"], min_tokens=1, max_steps=30))  # one step per line of the chain
    trap: str = "none"  # noisy teacher's planted mistake on train solutions: none | sign (-x as +x) | mul (*x as *(x+1))
    trap_p: float = 0.5  # probability that the teacher makes the planted mistake at a trap step
    trap_from: int = 1  # earliest line index of a trap step
    traps_per_chain: int = 1  # trap steps per problem

    def weight_key(self) -> dict[str, Any]:
        """Settings that change a warm start trained on this benchmark (trap fields only when on,
        so the clean setting keeps its shipped checkpoint's key)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("steps", "max_new_tokens", "max_rows")}
        if self.trap == "none":
            for k in TRAP_FIELDS:
                out.pop(k)
        return out

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
        check(self.trap in TRAPS, "benchmark.trap", self.trap, " | ".join(TRAPS))
        check(0.0 <= self.trap_p <= 1.0, "benchmark.trap_p", self.trap_p, "in [0, 1]")
        check(self.traps_per_chain >= 1, "benchmark.traps_per_chain", self.traps_per_chain, ">= 1")
        if self.trap == "sign":
            room = self.n_ops[0] - max(self.trap_from, 0) - self.n_mul  # non-mul lines >= trap_from, worst case
            check(0 <= self.trap_from and self.traps_per_chain <= room, "benchmark.traps_per_chain",
                  self.traps_per_chain, f"<= n_ops[0] - trap_from - n_mul = {room} (trap_from={self.trap_from})")
        elif self.trap == "mul":
            check(self.mul_from >= self.trap_from >= 0, "benchmark.trap_from", self.trap_from,
                  f"in 0..mul_from={self.mul_from} (mul traps sit on the * lines)")
            check(self.traps_per_chain <= self.n_mul, "benchmark.traps_per_chain", self.traps_per_chain,
                  f"<= n_mul={self.n_mul} (mul traps sit on the * lines)")


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


def _planted(value: int, op: str, x: int, trap: str) -> tuple[str, int]:
    """The teacher's wrong line for step `op x` from `value`, and the value it computes."""
    if trap == "sign":
        return f"{value}+{x}={value + x}", value + x
    return f"{value}*{x + 1}={value * (x + 1)}", value * (x + 1)


def make_trap_problem(rng: random.Random, cfg: ArithConfig) -> dict[str, Any]:
    """A problem with exactly cfg.traps_per_chain trap steps at lines >= trap_from (gold solution).

    Adds `pivots` (trap line indices), `trap_lines` (the planted line at each pivot given the gold
    prefix) and `ops` (the operations as (op, x)). Whole problems are redrawn until every value
    stays in 0..value_max, so a trap step is never replaced by a fallback.
    """
    for _ in range(1000):
        n = rng.randint(cfg.n_ops[0], cfg.n_ops[1])
        mul_at = sorted(rng.sample(range(cfg.mul_from, n), cfg.n_mul))
        if cfg.trap == "sign":
            pivots = sorted(rng.sample([i for i in range(cfg.trap_from, n) if i not in mul_at], cfg.traps_per_chain))
        else:
            pivots = sorted(rng.sample([i for i in mul_at if i >= cfg.trap_from], cfg.traps_per_chain))
        start = value = rng.randint(1, cfg.start_max)
        ops: list[tuple[str, int]] = []
        lines: list[str] = []
        ok = True
        for i in range(n):
            if cfg.trap == "mul" and i in pivots and value == 0:  # 0*(x+1) = 0*x: no visible mistake
                ok = False
                break
            for _ in range(100):
                if i in mul_at:
                    op, x = "*", rng.randint(2, cfg.mul_max)
                elif cfg.trap == "sign" and i >= cfg.trap_from:  # the only '-' steps here are the traps
                    op, x = ("-" if i in pivots else "+"), rng.randint(1, cfg.operand_max)
                else:
                    op, x = rng.choice("+-"), rng.randint(1, cfg.operand_max)
                new = _apply(value, op, x)
                if 0 <= new <= cfg.value_max:
                    break
            else:
                ok = False
                break
            ops.append((op, x))
            lines.append(f"{value}{op}{x}={new}")
            value = new
        if ok:
            break
    else:
        raise ValueError(f"arith: could not draw a trap problem within value_max={cfg.value_max}")
    gold_values = [start] + [int(line.split("=")[1]) for line in lines]
    trap_lines = [_planted(gold_values[i], *ops[i], cfg.trap)[0] for i in pivots]  # type: ignore[misc]
    prompt = f"Q: {start}," + ",".join(f"{op}{x}" for op, x in ops)
    return {"prompt": prompt, "answer": str(value), "lines": lines + [f"Answer: {value}"],
            "solution": "\n".join(lines + [f"Answer: {value}"]), "pivots": pivots, "pivot": pivots[0],
            "trap_lines": trap_lines, "ops": ops, "start": start}


def teacher_solution(row: dict[str, Any], trapped: Sequence[bool], trap: str) -> str:
    """The noisy teacher's worked solution: the planted mistake at each pivot where `trapped`,
    every other line computed correctly from the (possibly wrong) running value."""
    value, lines = row["start"], []
    wrong = {p for p, t in zip(row["pivots"], trapped) if t}
    for i, (op, x) in enumerate(row["ops"]):
        if i in wrong:
            line, new = _planted(value, op, x, trap)
        else:
            new = _apply(value, op, x)
            line = f"{value}{op}{x}={new}"
        lines.append(line)
        value = new
    return "\n".join(lines + [f"Answer: {value}"])


def is_flip(step: str, gold_line: str, trap: str) -> bool:
    """Is `step` the planted kind of mistake made on `gold_line` (computed consistently)?

    sign: the +/- operation with the opposite sign; mul: the * operand off by one (either way).
    """
    m = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", gold_line)
    s = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", step.strip())
    if m is None or s is None or s.group(1) != m.group(1):
        return False
    v, op, x = int(m.group(1)), m.group(2), int(m.group(3))
    sop, sx, sres = s.group(2), int(s.group(3)), int(s.group(4))
    if trap == "sign":
        return op in "+-" and sop in "+-" and sop != op and sx == x and sres == _apply(v, sop, sx)
    if trap == "mul":
        return op == "*" and sop == "*" and abs(sx - x) == 1 and sres == v * sx
    return False


@BENCHMARKS.register("arith", ArithConfig)
class Arith(Benchmark):
    name = "arith"
    cfg: ArithConfig

    def _load(self, split: str) -> list[dict[str, Any]]:
        # Disjoint splits: a problem's prompt belongs to the first split that generated it.
        seen: set[str] = set()
        out: dict[str, list[dict[str, Any]]] = {}
        make = make_problem if self.cfg.trap == "none" else make_trap_problem
        for s in ("test", "val", "train"):  # eval splits first so train never leaks into them
            rng = random.Random(self.cfg.seed * 1000 + _SPLIT_OFFSET[s])
            rows: list[dict[str, Any]] = []
            tries = 0
            while len(rows) < self.cfg.sizes.get(s, 0) and tries < 20 * self.cfg.sizes.get(s, 0) + 100:
                tries += 1
                row = make(rng, self.cfg)
                if row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    rows.append(row)
            if s == "train" and self.cfg.trap != "none":
                coin = random.Random(self.cfg.seed * 1000 + _TEACHER_OFFSET)
                for row in rows:
                    row["trapped"] = [coin.random() < self.cfg.trap_p for _ in row["pivots"]]
                    row["solution"] = teacher_solution(row, row["trapped"], self.cfg.trap)
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

    def error_class(self, steps: Sequence[str], row: dict[str, Any]) -> str:
        """What the first error is: none (no error found), trap (the planted mistake at a pivot),
        collateral (the planted kind of mistake at a non-trap step, e.g. `+x` written as `-x`),
        or other (anything else: a capacity error)."""
        i = self.first_wrong_step(steps, row)
        if i is None:
            return "none"
        pivots, trap_lines = row.get("pivots", []), row.get("trap_lines", [])
        if i in pivots and steps[i].strip() == trap_lines[pivots.index(i)]:
            return "trap"
        if i not in pivots and i < len(row["lines"]) - 1 and is_flip(steps[i], row["lines"][i], self.cfg.trap):
            return "collateral"
        return "other"
