"""The benchmark interface: rows in, prompts out, completions scored.

A benchmark is one Python file that subclasses `Benchmark`, declares a config dataclass
(subclassing `BenchmarkConfig`) and registers both with `@BENCHMARKS.register(name, ConfigCls)`,
plus one YAML in conf/benchmark/.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from gpo_exp.registry import ConfigError, Registry, check

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
MAX_VOTE_CHARS = 8000  # final answers live at the end: only this tail is searched
OVERFLOWS = ("tail", "balance")  # StepsConfig.overflow


@dataclass
class StepsConfig:
    """How a completion is cut into steps (the paper's code: newline delimiters, merge short, cap at 30).
    The rule, step by step, is in gpo_exp/rollout/steps.py."""

    delimiters: list[str] = field(default_factory=lambda: ["\n"])  # a step ends after any of these strings
    min_tokens: int = 1  # a step shorter than this many tokens is merged into the next one
    max_steps: int = 30  # at most this many steps; what happens past it is `overflow`
    overflow: str = "tail"  # more than max_steps steps: tail = the rest joins the last step | balance = merge neighbours into max_steps spans of similar token length (hub benchmarks)

    def __post_init__(self) -> None:
        check(len(self.delimiters) > 0 and all(len(d) > 0 for d in self.delimiters),
              "gpo.steps.delimiters", self.delimiters, "a non-empty list of non-empty strings")
        check(self.min_tokens >= 1, "gpo.steps.min_tokens", self.min_tokens, ">= 1")
        check(self.max_steps >= 1, "gpo.steps.max_steps", self.max_steps, ">= 1")
        check(self.overflow in OVERFLOWS, "gpo.steps.overflow", self.overflow, f"one of {', '.join(OVERFLOWS)}")


@dataclass
class BenchmarkConfig:
    """Fields every benchmark has. Subclasses add their own."""

    name: str = ""  # registry name, e.g. arith, gsm_symbolic, gsm8k
    seed: int = 0  # seed for generated problems and for split shuffling
    max_rows: dict[str, int] = field(default_factory=dict)  # optional cap per split, e.g. {test: 200}
    max_new_tokens: int = 128  # generation budget for one completion on this benchmark
    steps: StepsConfig = field(default_factory=StepsConfig)  # default step segmentation for this benchmark


class Benchmark:
    """Base class. Subclasses implement `_load`, `prompt`, `score`; arith adds `first_wrong_step`."""

    name: str = ""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg

    # --- to implement -------------------------------------------------------------------------
    def _load(self, split: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def prompt(self, row: dict[str, Any]) -> str:
        """The text the model is asked to continue (before any chat template)."""
        return row["prompt"]

    def score(self, completion: str, row: dict[str, Any]) -> float:
        """Final-answer correctness in [0, 1]. Never raises: an unparsable completion scores 0."""
        raise NotImplementedError

    def final_answer(self, completion: str) -> str | None:
        """The completion's final answer, for majority voting (maj@k): by default its last number."""
        nums = _NUMBER.findall(completion[-MAX_VOTE_CHARS:])
        return nums[-1].replace(",", "").rstrip(".") if nums else None

    def same_answer(self, a: str, b: str) -> bool:
        """Whether two final answers are the same answer (maj@k's vote groups). Default: equal strings."""
        return a == b

    def group_of(self, row: dict[str, Any]) -> str | None:
        """The row's group for per-group results (MMLU's subject, MMLU-Pro's category, BBH's task), or None."""
        return None

    def first_wrong_step(self, steps: Sequence[str], row: dict[str, Any]) -> int | None:
        """Index of the first wrong step of a completion, or None when unknown or all correct."""
        return None

    # --- shared -------------------------------------------------------------------------------
    def load(self, split: str) -> list[dict[str, Any]]:
        """Rows with at least `prompt` and `answer`; malformed rows are skipped and counted."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'; available: {', '.join(SPLITS)}")
        rows, bad = [], 0
        for row in self._load(split):
            if not isinstance(row.get("prompt"), str) or row.get("answer") in (None, ""):
                bad += 1
                continue
            rows.append(row)
        if bad:
            log.warning("%s/%s: skipped %d malformed rows (missing prompt or answer)", self.name, split, bad)
        cap = self.cfg.max_rows.get(split)
        if cap is not None:
            rows = rows[:cap]
        if not rows:
            raise ConfigError(f"benchmark {self.name} split '{split}' is empty; check benchmark.* settings")
        return rows


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")
