"""Benchmarks: `get(name)` returns a ready benchmark; importing this package registers them all."""
from __future__ import annotations

from typing import Any

from gpo_exp.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkConfig, StepsConfig

# Import for registration side effects: each module registers its benchmark(s).
from gpo_exp.benchmarks import arith  # noqa: F401,E402
from gpo_exp.benchmarks import gsm_symbolic  # noqa: F401,E402
from gpo_exp.benchmarks import hub  # noqa: F401,E402
from gpo_exp.benchmarks import mmlu  # noqa: F401,E402


def get(name: str, **overrides: Any) -> Benchmark:
    """Build benchmark `name` with its defaults, overridden by keyword arguments."""
    return BENCHMARKS.build({"name": name, **overrides})


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkConfig", "StepsConfig", "get"]
