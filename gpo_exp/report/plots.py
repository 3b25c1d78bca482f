"""The report's figures (matplotlib, Agg backend): learning curves, critical-step positions, rollout cost.

The data behind each figure comes from a small function (round_curves, critical_step_fractions,
estimator_values, arm_values) so it can be tested without looking at pixels; every figure follows
the grammar of gpo_exp.report.style (colour = optimizer, line style and marker = GPO or baseline). Each plot returns False and writes
nothing when the runs lack its data (e.g. no GPO arm, no rounds.jsonl).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from gpo_exp.report.stats import summarize  # noqa: E402
from gpo_exp.report.style import figure, legend_outside, styles  # noqa: E402
from gpo_exp.report.types import Arm, Run  # noqa: E402


@dataclass
class Curve:
    """One line of accuracy_vs_round.png: an arm on one training benchmark, averaged over seeds."""

    arm: Arm
    label: str
    rounds: list[int]
    mean: list[float]  # metric per round, mean over the runs that logged that round
    ci95: list[float]  # 95% CI half-width per round (0 when n < 2)
    tokens: list[float | None]  # mean cumulative generated tokens per round (None when not logged)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def round_curves(arms: Sequence[Arm], key: str) -> list[Curve]:
    """`key` from rounds.jsonl per arm (split by training benchmark when an arm has several)."""
    curves = []
    for arm in arms:
        by_bench: dict[str, list[Run]] = defaultdict(list)
        for run in arm.runs:
            by_bench[run.benchmark].append(run)
        for bench, runs in sorted(by_bench.items()):
            values: dict[int, list[float]] = defaultdict(list)
            tokens: dict[int, list[float]] = defaultdict(list)
            for rec in (rec for run in runs for rec in run.rounds):
                if isinstance(rec.get("round"), int) and _num(rec.get(key)):
                    values[rec["round"]].append(float(rec[key]))
                    if _num(rec.get("rollout/generated_tokens")):
                        tokens[rec["round"]].append(float(rec["rollout/generated_tokens"]))
            if values:
                rounds = sorted(values)
                stats = [summarize(values[r]) for r in rounds]
                curves.append(Curve(arm, arm.label if len(by_bench) == 1 else f"{arm.label} · {bench}", rounds,
                                    [st.mean for st in stats], [st.ci95 or 0.0 for st in stats],
                                    [sum(tokens[r]) / len(tokens[r]) if tokens[r] else None for r in rounds]))
    return curves


def plot_accuracy_vs_round(arms: Sequence[Arm], path: Path, metric: str) -> bool:
    """Mean over seeds per arm vs round (band: 95% CI), and vs cumulative generated tokens (steps: the
    policy evaluated after a round holds until the next evaluation)."""
    key = metric.removesuffix("_after")  # eval/accuracy_after -> eval/accuracy in rounds.jsonl
    if not any(key in rec for arm in arms for run in arm.runs for rec in run.rounds):
        key = "eval/accuracy"
    curves = round_curves(arms, key)
    if not curves:
        return False
    scale = 100.0 if "accuracy" in key else 1.0
    style = styles(arms)
    fig, (ax_r, ax_t) = figure(2, 5.2, 3.8, len(curves), max(len(c.label) for c in curves))
    handles = []
    for c in curves:
        st = style[c.arm.label]
        mean = [m * scale for m in c.mean]
        x = [r + st.dodge for r in c.rounds]
        (h,) = ax_r.plot(x, mean, label=c.label, **st.line())
        lo, hi = (0.0, 100.0) if scale == 100 else (-math.inf, math.inf)  # an accuracy's CI stays within 0-100%
        ax_r.fill_between(x, [max(lo, m - e * scale) for m, e in zip(mean, c.ci95)],
                          [min(hi, m + e * scale) for m, e in zip(mean, c.ci95)], color=st.color, alpha=0.12,
                          linewidth=0, zorder=1)
        points = [(t, m) for t, m in zip(c.tokens, mean) if t is not None]
        if points:
            ax_t.plot([t for t, _ in points], [m for _, m in points], drawstyle="steps-post", **st.line())
        handles.append(h)
    ylabel = f"{key}{' (%)' if scale == 100 else ''}, mean over seeds"
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_r.set(xlabel="round (0 = before training)", ylabel=ylabel, title="by round (band: 95% CI)")
    ax_t.set(xlabel="cumulative generated tokens", ylabel=ylabel, title="by generation cost (markers: evaluations)")
    for ax in (ax_r, ax_t):
        ax.grid(alpha=0.3)
    legend_outside(fig, handles, [c.label for c in curves], "solid ●: GPO · dashed ■: baseline")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def critical_step_fractions(arm: Arm) -> list[float]:
    """`gpo/critical_step_hist` summed over the arm's runs (padded to the longest), as fractions; [] if empty."""
    counts: list[float] = []
    for run in arm.runs:
        hist = run.summary.get("gpo/critical_step_hist") or []
        counts += [0.0] * (len(hist) - len(counts))
        for i, c in enumerate(hist):
            counts[i] += float(c)
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else []


def plot_critical_steps(arms: Sequence[Arm], path: Path) -> bool:
    """Where the critical step falls: `gpo/critical_step_hist` summed over seeds, normalised, per GPO arm.

    The legend adds the mean of `gpo/critical_agrees_first_error` (a fraction) where runs report it.
    """
    style = styles(arms)
    series = []
    for arm in arms:
        fractions = critical_step_fractions(arm) if arm.gpo else []
        if fractions:
            agree = [float(v) for r in arm.runs
                     if _num(v := r.summary.get("gpo/critical_agrees_first_error"))]
            label = arm.label + (f" (= first error {100 * sum(agree) / len(agree):.0f}%)" if agree else "")
            series.append((label, fractions, style[arm.label]))
    if not series:
        return False
    steps = max(max((i for i, f in enumerate(fr) if f > 0), default=0) + 1 for _, fr, _ in series)
    series = [(label, fr[:steps], st) for label, fr, st in series]  # no empty bins past the last critical step
    fig, (ax,) = figure(1, max(5.0, 0.45 * steps + 2.5), 3.8, len(series), max(len(lbl) for lbl, _, _ in series))
    width = 0.8 / len(series)
    handles = []
    for j, (label, fractions, st) in enumerate(series):  # grouped bars, one group per step position
        handles.append(ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(fractions))], fractions, width=width,
                              color=st.color, edgecolor="white", linewidth=0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="critical step position (0 = first step)", ylabel="fraction of critical steps",
           title="critical-step positions, summed over seeds")
    ax.grid(axis="y", alpha=0.3)
    legend_outside(fig, handles, [lbl for lbl, _, _ in series])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def estimator_values(arms: Sequence[Arm], key: str) -> dict[str, list[float]]:
    """Summary `key` of every GPO run, grouped by estimator ("mc K=4")."""
    out: dict[str, list[float]] = defaultdict(list)
    for arm in arms:
        for run in arm.runs if arm.gpo else []:
            if _num(v := run.summary.get(key)):
                out[run.estimator].append(float(v))
    return dict(out)


def arm_values(arms: Sequence[Arm], key: str) -> dict[str, list[float]]:
    """Summary `key` of every run of every GPO arm, by arm label (table order)."""
    out: dict[str, list[float]] = {}
    for arm in arms:
        values = [float(v) for run in arm.runs if _num(v := run.summary.get(key))] if arm.gpo else []
        if values:
            out[arm.label] = values
    return out


def plot_rollout_cost(arms: Sequence[Arm], path: Path) -> bool:
    """Rollouts and rollout tokens per trajectory of each GPO arm (mean ± 95% CI over its runs)."""
    panels = (("gpo/rollouts_per_trajectory", "rollouts / trajectory"),
              ("gpo/rollout_tokens_per_trajectory", "rollout tokens / trajectory"))
    data = {key: arm_values(arms, key) for key, _ in panels}
    labels = [a.label for a in arms if any(a.label in d for d in data.values())]
    if not labels:
        return False
    style = styles(arms)
    fig, axes = figure(2, 0.45 * len(labels) + 2.2, 3.8, len(labels), max(map(len, labels)))
    handles: dict[str, Any] = {}
    for ax, (key, title) in zip(axes, panels):
        for i, label in enumerate(labels):
            if label in data[key]:
                st = summarize(data[key][label])
                handles[label] = ax.bar(i, st.mean, yerr=st.ci95 or 0.0, capsize=4, color=style[label].color,
                                        edgecolor="white")
        ax.set_xticks([])
        ax.set(title=title, xlabel="GPO arm (colours: legend)", ylabel="mean over runs (bars: 95% CI)")
        ax.grid(axis="y", alpha=0.3)
    legend_outside(fig, [handles[lbl] for lbl in labels if lbl in handles], [lbl for lbl in labels if lbl in handles])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_all(arms: Sequence[Arm], out_dir: Path, metric: str) -> list[Path]:
    """Write every figure that has data; return the paths written."""
    out = []
    jobs = (("accuracy_vs_round.png", lambda p: plot_accuracy_vs_round(arms, p, metric)),
            ("critical_steps.png", lambda p: plot_critical_steps(arms, p)),
            ("rollout_cost.png", lambda p: plot_rollout_cost(arms, p)))
    for name, plot in jobs:
        if plot(out_dir / name):
            out.append(out_dir / name)
    return out
