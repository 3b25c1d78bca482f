"""Statistics of the report: means with 95% Student-t confidence intervals (scipy.stats.t), Welch differences."""
from __future__ import annotations

import math
from typing import Sequence

from gpo_exp.registry import check
from gpo_exp.report.types import Stat


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with `df` (real, > 0: Welch's df is not an integer) degrees of freedom."""
    from scipy.stats import t  # scipy only when statistics are computed

    check(0.5 <= p < 1, "p", p, "in [0.5, 1)")
    check(df > 0, "df", df, "> 0")
    return float(t.ppf(p, df))


def summarize(values: Sequence[float]) -> Stat:
    """Mean ± t(0.975, n-1) * s / sqrt(n)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Stat(mean, None, n, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(mean, t_quantile(0.975, n - 1) * std / math.sqrt(n), n, std)


def welch_diff(a: Sequence[float], b: Sequence[float]) -> Stat:
    """mean(a) - mean(b) with Welch's 95% CI half-width (unequal variances, unpaired)."""
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    if sa.std is None or sb.std is None:
        return Stat(diff, None, sa.n + sb.n, None)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    if va + vb == 0:  # both arms constant: no spread, the difference is exact
        return Stat(diff, 0.0, sa.n + sb.n, None)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    return Stat(diff, t_quantile(0.975, df) * math.sqrt(va + vb), sa.n + sb.n, None)
