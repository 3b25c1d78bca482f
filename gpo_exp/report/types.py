"""The report's shared types: a run read back from its directory, an arm (runs pooled into one row), a row.

The bottom of the report package: the other modules import these, this module imports none of them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_METRIC = "eval/accuracy_after"
AVG = "Avg"
ORDER = ("dpo", "kto", "simpo", "orpo", "ppo", "grpo")  # row order of the paper's tables
NICE = {"dpo": "DPO", "kto": "KTO", "simpo": "SimPO", "orpo": "ORPO", "ppo": "PPO", "grpo": "GRPO"}
RUN_METRICS = {"rollout/generated_tokens": "gen. tokens", "time/total_s": "time (s)"}  # extra table columns


class ReportError(RuntimeError):
    """Nothing to report on, or a source that cannot be read. The message is one line."""


@dataclass
class Stat:
    """Mean of some values with the 95% CI half-width (None when it is undefined, n < 2)."""

    mean: float
    ci95: float | None
    n: int
    std: float | None  # sample std (n - 1); None for n < 2 and for differences


def _get(d: dict[str, Any], key: str, default: Any = None) -> Any:
    """d["a.b.c"] if present (wandb may flatten), else d["a"]["b"]["c"], else default."""
    if key in d:
        return d[key]
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _number(v: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, strings, bools)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


@dataclass
class Run:
    """One finished run: its summary.json, resolved config and rounds.jsonl records."""

    name: str  # path relative to the report root (or the wandb run name)
    summary: dict[str, Any]
    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    row_correct: dict[int, str] = field(default_factory=dict)  # round -> greedy correctness per diagnosed test row ('0'/'1')

    def cfg(self, key: str, default: Any = None) -> Any:
        return _get(self.config, key, default)

    @property
    def base(self) -> str:
        """Base optimizer name, lower case (falls back to the summary's `arm` string)."""
        name = self.cfg("optimizer.name") or str(self.summary.get("arm", "unknown")).removeprefix("GPO-")
        return str(name).lower()

    @property
    def gpo(self) -> bool:
        enabled = self.cfg("gpo.enabled")
        return bool(enabled) if enabled is not None else str(self.summary.get("arm", "")).startswith("GPO-")

    @property
    def seed(self) -> Any:
        return self.cfg("seed", self.name)  # without a seed every run is its own sample

    @property
    def benchmark(self) -> str:
        return str(self.cfg("benchmark.name") or "benchmark")

    @property
    def estimator(self) -> str:
        return f"{self.cfg('estimator.name', '?')} K={self.cfg('estimator.k', '?')}"

    def scores(self, metric: str) -> dict[str, float]:
        """Benchmark -> value of `metric`: the training benchmark's `metric` and `<p>/<bench>/<rest>`."""
        prefix, _, rest = metric.partition("/")
        out: dict[str, float] = {}
        if rest:
            pattern = re.compile(rf"{re.escape(prefix)}/([^/]+)/{re.escape(rest)}")
            for key, value in self.summary.items():
                m = pattern.fullmatch(key)
                if m and _number(value) is not None:
                    out[m.group(1)] = float(value)
        if _number(self.summary.get(metric)) is not None:
            out[self.benchmark] = float(self.summary[metric])  # the plain key wins over a duplicate
        return out


@dataclass
class Arm:
    """Runs that form one table row."""

    label: str  # e.g. "DPO", "GPO-DPO", "GPO-DPO (bisect, K=8)"
    base: str  # base optimizer, lower case
    gpo: bool
    runs: list[Run]

    @property
    def base_label(self) -> str:
        return NICE.get(self.base, self.base.upper())


@dataclass
class Row:
    """One number of the report (one line of report.csv)."""

    kind: str  # "arm", or "delta" for GPO-X minus X
    arm: str  # arm label, or "Δ GPO-X vs X"
    benchmark: str  # a benchmark column, "Avg", or "" for run-level metrics
    metric: str  # summary.json key
    mean: float
    ci95: float | None  # 95% CI half-width; None when n < 2
    n: int  # runs behind the number (both arms for a delta)
    std: float | None  # sample std over runs; None for n < 2 and for deltas
