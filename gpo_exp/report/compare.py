"""Comparisons at equal rounds and at equal generated tokens, with 95% CIs (part of `gpo_exp.report`).

For every arm, over its seeds (mean ± 95% Student-t half-width):

- eq. rounds: `eval/accuracy` at the last round every run of the report reached (R);
- eq. tokens: `eval/accuracy` of the policy each run had when its cumulative generated rollout tokens
  first covered the common budget T (the last evaluation logged at <= T tokens; T = the smallest
  final token count over all runs, so every run reached it);
- eq. examples: likewise at a common number of training examples E (cumulative `train/examples`), one E
  per base optimizer, since a DPO example is a pair and a GRPO/PPO one a rollout (E_X = the smallest final
  count over the X and GPO-X runs), for runs that log it: an arm that trains on more examples per round
  (GPO's fresh plus reset groups) is read where its base has trained on as many;
- AUC: token-weighted mean accuracy over [0, T] (the area under the accuracy-vs-tokens step curve / T).

For every GPO-X with an X arm, Δ = GPO-X - X for each of the three: by seed (paired t over the
seeds both arms ran, Welch otherwise), and paired over test rows: each row's greedy correctness
averaged over seeds, differenced between the arms, t CI over rows (runs that wrote
rounds/roundNNN_eval.jsonl, one line per diagnosed test row; same test rows in both arms). Writes accuracy_vs_tokens.png: one colour
per base optimizer, GPO solid with circles, baseline dashed with squares (gpo_exp.report.style), T marked.

Student t quantiles come from `gpo_exp.report.stats.t_quantile` (scipy.stats.t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gpo_exp.report.stats import summarize, welch_diff
from gpo_exp.report.types import NICE, Arm, Row, Run, Stat

KEY = "eval/accuracy"
CORRECT = "eval/diag/greedy_correct"  # per-row greedy correctness in a rounds.jsonl record (runs before rounds/roundNNN_eval.jsonl)
MEASURES = ("eq_rounds", "eq_tokens", "eq_examples", "auc_tokens")
TOKENS, EXAMPLES = "rollout/generated_tokens", "train/examples"  # cumulative x-axes in rounds.jsonl records


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve(run: Run, key: str = KEY, x: str = TOKENS) -> list[tuple[int, float, float]]:
    """(round, cumulative x (generated tokens by default), value) per logged evaluation, by round; empty
    when a record lacks x (runs that predate the counter)."""
    recs = [r for r in run.rounds if isinstance(r.get("round"), int) and _num(r.get(key))]
    if x != TOKENS and not all(_num(r.get(x)) for r in recs):
        return []
    return sorted((int(r["round"]), float(r.get(x) or 0.0), float(r[key])) for r in recs)


def record_at_tokens(run: Run, budget: float, x: str = TOKENS) -> dict[str, Any] | None:
    """The last rounds.jsonl record whose cumulative x (tokens by default) is <= budget (round 0 has 0)."""
    recs = [r for r in run.rounds if isinstance(r.get("round"), int) and _num(r.get(x)) and float(r[x]) <= budget]
    return max(recs, key=lambda r: r["round"]) if recs else None


def value_at_tokens(points: Sequence[tuple[int, float, float]], budget: float) -> float | None:
    """Value of the last evaluation at <= budget tokens (the policy available at that spend)."""
    inside = [v for _, t, v in points if t <= budget]
    return inside[-1] if inside else None


def auc_tokens(points: Sequence[tuple[int, float, float]], budget: float) -> float | None:
    """Token-weighted mean of the step curve over [0, budget]: evaluation i holds until the next one's tokens."""
    if not points or budget <= 0 or points[0][1] > 0:
        return None
    area = 0.0
    for i, (_, t, v) in enumerate(points):
        end = min(points[i + 1][1] if i + 1 < len(points) else math.inf, budget)
        if end > t:
            area += v * (end - t)
    return area / budget


def value_at_round(points: Sequence[tuple[int, float, float]], r: int) -> float | None:
    return next((v for rr, _, v in points if rr == r), None)


def paired_diff(a: Sequence[float], b: Sequence[float]) -> Stat:
    """mean(a - b) with the paired-t 95% half-width (a[i] and b[i] from the same unit)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    st = summarize(d)
    return Stat(st.mean, st.ci95, st.n, None)


def _by_seed(arm: Arm, fn) -> dict[Any, float]:
    out = {}
    for run in arm.runs:
        v = fn(run)
        if v is not None:
            out[run.seed] = v
    return out


def seed_delta(a: dict[Any, float], b: dict[Any, float]) -> tuple[Stat, str] | None:
    """Paired over shared seeds when there are >= 2 of them, Welch otherwise."""
    shared = sorted(set(a) & set(b), key=str)
    if len(shared) >= 2:
        return paired_diff([a[s] for s in shared], [b[s] for s in shared]), "paired by seed"
    if a and b:
        return welch_diff(list(a.values()), list(b.values())), "Welch"
    return None


def row_correctness(runs: Sequence[Run], pick) -> list[float] | None:
    """Per test row, the mean over runs of greedy correctness in the record `pick(run)` chooses."""
    vecs = []
    for run in runs:
        rec = pick(run)
        s = (run.row_correct.get(rec["round"]) or rec.get(CORRECT)) if rec else None  # older runs: in the record
        if not isinstance(s, str):
            return None
        vecs.append([c == "1" for c in s])
    if not vecs or len({len(v) for v in vecs}) != 1:
        return None
    return [sum(col) / len(col) for col in zip(*vecs)]


def row_delta(a: Arm, b: Arm, pick) -> Stat | None:
    """GPO-X minus X paired over the same test rows (row-level t CI)."""
    ra, rb = row_correctness(a.runs, pick), row_correctness(b.runs, pick)
    if ra is None or rb is None or len(ra) != len(rb) or len(ra) < 2:
        return None
    return paired_diff(ra, rb)


@dataclass
class Comparison:
    markdown: str
    rows: list[Row] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    budget: float | None = None
    rounds: int | None = None


def _fmt(st: Stat | None) -> str:
    if st is None:
        return "–"
    return f"{100 * st.mean:+.1f}" + (f" ± {100 * st.ci95:.1f}" if st.ci95 is not None else "")


def _fmt_arm(st: Stat | None) -> str:
    if st is None:
        return "–"
    return f"{100 * st.mean:.1f}" + (f" ± {100 * st.ci95:.1f}" if st.ci95 is not None else "")


def compare(arms: Sequence[Arm], out_dir: Path | None = None) -> Comparison:
    """The equal-rounds / equal-tokens table (markdown), its rows (for report.csv) and the tokens plot."""
    curves = {id(run): curve(run) for arm in arms for run in arm.runs}
    usable = [run for arm in arms for run in arm.runs if len(curves[id(run)]) >= 2]
    if not usable:
        return Comparison("")
    budget = min(curves[id(r)][-1][1] for r in usable)
    rounds = min(curves[id(r)][-1][0] for r in usable)
    if budget <= 0:
        return Comparison("")
    ex_curves = {id(run): curve(run, x=EXAMPLES) for run in usable}
    ends: dict[str, list[float | None]] = {}  # per base optimizer: examples are pairs for some, rollouts for others
    for run in usable:
        ends.setdefault(run.base, []).append(ex_curves[id(run)][-1][1] if ex_curves[id(run)] else None)
    # a run without the counter leaves its optimizer without a comparison at equal examples
    ex_budget = {b: min(e) for b, e in ends.items() if None not in e and min(e) > 0}  # type: ignore[type-var]
    measure = {
        "eq_rounds": lambda run: value_at_round(curves[id(run)], rounds),
        "eq_tokens": lambda run: value_at_tokens(curves[id(run)], budget),
        "eq_examples": lambda run: (value_at_tokens(ex_curves[id(run)], ex_budget[run.base])
                                    if run.base in ex_budget and id(run) in ex_curves else None),
        "auc_tokens": lambda run: auc_tokens(curves[id(run)], budget),
    }
    pick = {"eq_rounds": lambda run: next((r for r in run.rounds if r.get("round") == rounds), None),
            "eq_tokens": lambda run: record_at_tokens(run, budget),
            "eq_examples": lambda run: (record_at_tokens(run, ex_budget[run.base], EXAMPLES)
                                        if run.base in ex_budget else None)}
    rows: list[Row] = []
    at_e = (" and equal training examples (E: " + ", ".join(f"{NICE.get(b, b.upper())} {e:,.0f}" for b, e in ex_budget.items())
            + ")") if ex_budget else ""
    lines = [f"### Equal rounds (R = {rounds}), equal generated tokens (T = {budget:,.0f}){at_e}", "",
             "greedy `eval/accuracy` in %, mean ± 95% CI over seeds; AUC: token-weighted mean accuracy over "
             "[0, T]. Δ by seed: paired t over shared seeds (Welch otherwise); Δ by row: paired over the same "
             "test rows (greedy correctness averaged over seeds).", "",
             "| Method | n | eq. rounds | eq. tokens | eq. examples | AUC (tokens) | Δ eq. rounds (rows) "
             "| Δ eq. tokens (rows) | Δ eq. examples (rows) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_label = {a.label: a for a in arms}
    for arm in arms:
        stats = {}
        for m in MEASURES:
            vals = list(_by_seed(arm, measure[m]).values())
            stats[m] = summarize(vals) if vals else None
            if vals:
                st = stats[m]
                rows.append(Row("compare", arm.label, "", f"{m}:{KEY}", st.mean, st.ci95, st.n, st.std))
        lines.append(f"| {arm.label} | {len(arm.runs)} | " + " | ".join(_fmt_arm(stats[m]) for m in MEASURES)
                     + " | | | |")
        base = by_label.get(arm.base_label) if arm.gpo else None
        if base is None:
            continue
        label = f"Δ {arm.label} vs {base.label}"
        cells, row_cells = [], []
        for m in MEASURES:
            d = seed_delta(_by_seed(arm, measure[m]), _by_seed(base, measure[m]))
            cells.append(_fmt(d[0]) if d else "–")
            if d:
                rows.append(Row("compare_delta", label, "", f"{m}:{KEY}", d[0].mean, d[0].ci95, d[0].n, None))
        for m in ("eq_rounds", "eq_tokens", "eq_examples"):
            rd = row_delta(arm, base, pick[m])
            row_cells.append(_fmt(rd))
            if rd is not None:
                rows.append(Row("compare_rows", label, "", f"{m}:{KEY}", rd.mean, rd.ci95, rd.n, None))
        lines.append(f"| {label} | | " + " | ".join(cells) + " | " + " | ".join(row_cells) + " |")
    lines += ["", *by_round_table(arms, curves)]
    pngs = []
    if out_dir is not None and plot_accuracy_vs_tokens(arms, curves, budget, Path(out_dir) / "accuracy_vs_tokens.png"):
        pngs.append(Path(out_dir) / "accuracy_vs_tokens.png")
    return Comparison("\n".join(lines), rows, pngs, budget, rounds)


def by_round_table(arms: Sequence[Arm], curves: dict[int, list[tuple[int, float, float]]]) -> list[str]:
    """Markdown: each arm's mean accuracy (%) and mean cumulative generated tokens after every round that
    all its runs reached, so per-round speed and per-token cost read side by side."""
    out = ["#### By round: greedy accuracy % (cumulative generated tokens, mean over seeds)", ""]
    per_arm = []
    for arm in arms:
        pts = [curves[id(r)] for r in arm.runs if curves[id(r)]]
        if not pts:
            continue
        last = min(p[-1][0] for p in pts)
        cells = []
        for r in range(last + 1):
            at = [next(((t, v) for rr, t, v in p if rr == r), None) for p in pts]
            if any(a is None for a in at):
                cells.append("–")
                continue
            tok = sum(a[0] for a in at) / len(at)  # type: ignore[index]
            acc = sum(a[1] for a in at) / len(at)  # type: ignore[index]
            cells.append(f"{100 * acc:.1f} ({tok / 1000:.0f}k)")
        per_arm.append((arm.label, cells))
    if not per_arm:
        return []
    width = max(len(c) for _, c in per_arm)
    out += ["| Method | " + " | ".join(f"round {r}" for r in range(width)) + " |",
            "|---|" + "---:|" * width]
    out += [f"| {label} | " + " | ".join(cells + [""] * (width - len(cells))) + " |" for label, cells in per_arm]
    return out


def arm_token_curve(arm: Arm, curves: dict[int, list[tuple[int, float, float]]]
                    ) -> tuple[list[float], list[float], list[float]]:
    """The arm's mean step curve over seeds and its 95% half-width, at every token count where one of its
    runs evaluated, up to the arm's smallest final spend (between two such counts the curve is flat)."""
    pts = [curves[id(r)] for r in arm.runs if len(curves[id(r)]) >= 2]
    if not pts:
        return [], [], []
    end = min(p[-1][1] for p in pts)
    grid = sorted({t for p in pts for _, t, _ in p if t <= end} | {end})
    mean, half = [], []
    for g in grid:
        st = summarize([value_at_tokens(p, g) for p in pts])  # type: ignore[misc]
        mean.append(st.mean)
        half.append(st.ci95 or 0.0)
    return grid, mean, half


def plot_accuracy_vs_tokens(arms: Sequence[Arm], curves: dict[int, list[tuple[int, float, float]]], budget: float,
                            path: Path) -> bool:
    """Accuracy vs cumulative generated tokens as step curves (markers: where a run evaluated), T marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpo_exp.report.style import figure, legend_outside, styles

    style = styles(arms)
    drawn = [(arm, arm_token_curve(arm, curves)) for arm in arms]
    drawn = [(arm, c) for arm, c in drawn if c[0]]
    if not drawn:
        return False
    labels = [f"{arm.label} (n={len(arm.runs)})" for arm, _ in drawn]
    fig, (ax,) = figure(1, 6.5, 4.2, len(labels) + 1, max(map(len, labels)))
    handles = []
    for (arm, (grid, mean, half)), label in zip(drawn, labels):
        st = style[arm.label]
        (h,) = ax.plot(grid, [100 * m for m in mean], drawstyle="steps-post", **st.line())
        ax.fill_between(grid, [max(0.0, 100 * (m - e)) for m, e in zip(mean, half)],
                        [min(100.0, 100 * (m + e)) for m, e in zip(mean, half)],
                        step="post", color=st.color, alpha=0.12, linewidth=0, zorder=1)
        handles.append(h)
    handles.append(ax.axvline(budget, color="grey", linestyle=":"))
    labels.append(f"equal-token budget T = {budget:,.0f}")
    ax.set(xlabel="cumulative generated rollout tokens", ylabel="greedy accuracy (%), mean over seeds",
           title="accuracy vs generated tokens (band: 95% CI)")
    ax.grid(alpha=0.3)
    legend_outside(fig, handles, labels, "solid ●: GPO · dashed ■: baseline")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
