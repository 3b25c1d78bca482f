"""The paper-shaped table: rows X, GPO-X and "Δ GPO-X vs X", report.md and report.csv, then the figures."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gpo_exp.report.collect import collect_jobs, group_arms
from gpo_exp.report.stats import summarize, welch_diff
from gpo_exp.report.types import AVG, DEFAULT_METRIC, RUN_METRICS, Arm, ReportError, Row, Run, Stat, _number


@dataclass
class Report:
    """Everything `python -m gpo_exp.report` prints and writes."""

    table_markdown: str  # the paper-shaped table (printed by main)
    rows: list[Row]  # every number, as in report.csv
    missing: list[str]  # jobs without results: partial dirs and never-started sweep jobs, by overrides
    files: list[Path]  # report.md, report.csv and the PNGs that had data
    arms: list[Arm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats shown under the table
    failed: list[str] = field(default_factory=list)  # jobs whose summary.json says failed/diverged, with the error
    comparison: str = ""  # equal rounds / equal tokens table (gpo_exp.report.compare), printed under the table

    def row(self, arm: str, benchmark: str, metric: str = DEFAULT_METRIC) -> Row:
        """The row for (arm, benchmark, metric); KeyError naming what exists otherwise."""
        for r in self.rows:
            if (r.arm, r.benchmark, r.metric) == (arm, benchmark, metric):
                return r
        raise KeyError(f"no row ({arm!r}, {benchmark!r}, {metric!r}); arms: {sorted({r.arm for r in self.rows})}")


def column_values(arm: Arm, metric: str, columns: Sequence[str]) -> dict[str, list[float]]:
    """Per benchmark column, one value per run; under AVG, one per seed that has every column."""
    values: dict[str, list[float]] = {c: [] for c in columns}
    by_seed: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in arm.runs:
        for bench, v in run.scores(metric).items():
            if bench not in values:
                continue  # e.g. a `_before` value for a benchmark without an `_after` column
            values[bench].append(v)
            by_seed[run.seed][bench].append(v)
    values[AVG] = [
        math.fsum(math.fsum(seed[c]) / len(seed[c]) for c in columns) / len(columns)
        for seed in by_seed.values()
        if all(seed.get(c) for c in columns)
    ]
    return values


def _before_metric(metric: str) -> str | None:
    return metric.removesuffix("_after") + "_before" if metric.endswith("_after") else None


def _fmt(stat: Stat | Row | None, percent: bool, signed: bool = False, ci: bool = True) -> str:
    """'52.0 ± 5.0' (percent) or '0.52 ± 0.0497'; '–' for no data."""
    if stat is None:
        return "–"
    scale, spec = (100.0, ".1f") if percent else (1.0, ".4g")
    text = format(stat.mean * scale, ("+" if signed else "") + spec)
    if ci and stat.ci95 is not None:
        text += " ± " + format(stat.ci95 * scale, spec)
    return text


def _stat_rows(kind: str, label: str, metric: str, values: dict[str, list[float]]) -> dict[str, Row]:
    """Column -> Row for the columns that have values."""
    out = {}
    for col, v in values.items():
        if v:
            st = summarize(v)
            out[col] = Row(kind, label, col, metric, st.mean, st.ci95, st.n, st.std)
    return out


def _arm_rows(arm: Arm, metric: str, columns: list[str]) -> list[Row]:
    """The arm's metric per column and Avg, its `_before` counterpart, and run-level tokens and time."""
    rows = list(_stat_rows("arm", arm.label, metric, column_values(arm, metric, columns)).values())
    if before := _before_metric(metric):
        rows += _stat_rows("arm", arm.label, before, column_values(arm, before, columns)).values()
    for key in RUN_METRICS:
        v = [x for x in (_number(r.summary.get(key)) for r in arm.runs) if x is not None]
        rows += _stat_rows("arm", arm.label, key, {"": v}).values()
    return rows


def _delta_label(arm: Arm) -> str:
    return f"Δ {arm.label} vs {arm.base_label}"


def _delta_rows(arm: Arm, base: Arm, metric: str, columns: list[str]) -> list[Row]:
    """GPO arm minus its base arm per column and Avg (Welch CI)."""
    a, b = column_values(arm, metric, columns), column_values(base, metric, columns)
    label = _delta_label(arm)
    out = []
    for col in columns + [AVG]:
        if a[col] and b[col]:
            st = welch_diff(a[col], b[col])
            out.append(Row("delta", label, col, metric, st.mean, st.ci95, st.n, None))
    return out


def _table(arms: list[Arm], rows: list[Row], metric: str, columns: list[str]) -> str:
    """The paper-shaped markdown table from the rows (Δ row under each GPO arm that has a base)."""
    percent = "accuracy" in metric
    cell = {(r.arm, r.benchmark, r.metric): r for r in rows}

    def fmt(label: str, col: str, key: str, **kw: Any) -> str:
        return _fmt(cell.get((label, col, key)), percent, **kw)

    deltas = {r.arm for r in rows if r.kind == "delta"}
    lines = []
    for arm in arms:
        tokens_time = [f"{r.mean:,.0f}" if (r := cell.get((arm.label, "", k))) else "–" for k in RUN_METRICS]
        before = _before_metric(metric) or ""
        lines.append([arm.label] + [fmt(arm.label, c, metric) for c in columns + [AVG]]
                     + [str(len(arm.runs)), fmt(arm.label, AVG, before, ci=False)] + tokens_time)
        delta = _delta_label(arm)
        if delta in deltas:
            lines.append([delta] + [fmt(delta, c, metric, signed=True) for c in columns + [AVG]]
                         + [""] * (2 + len(RUN_METRICS)))
    unit = " (%)" if percent else ""
    header = (["Method"] + [f"{c}{unit}" for c in columns + [AVG]] + ["n", f"before{unit}"]
              + list(RUN_METRICS.values()))
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def _duplicate_seed_notes(arms: list[Arm]) -> list[str]:
    """Runs of one arm that share seed and benchmark (an unlabelled sweep?) are pooled; say so."""
    notes = []
    for arm in arms:
        count: dict[tuple[Any, str], int] = defaultdict(int)
        for run in arm.runs:
            count[(run.seed, run.benchmark)] += 1
        notes += [f"{arm.label}: {n} runs share seed {s} on {b}; pooled as separate samples"
                  for (s, b), n in count.items() if n > 1]
    return notes


def _write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "arm", "benchmark", "metric", "mean", "ci95", "n", "std"])
        for r in rows:
            w.writerow([r.kind, r.arm, r.benchmark, r.metric, repr(r.mean), "" if r.ci95 is None else repr(r.ci95),
                        r.n, "" if r.std is None else repr(r.std)])


def _write_markdown(path: Path, source: str, metric: str, table: str, notes: list[str], missing: list[str],
                    pngs: list[Path], failed: Sequence[str] = ()) -> None:
    md = [f"# GPO report: {source}", "",
          f"`{metric}`{' in %' if 'accuracy' in metric else ''}: mean ± 95% CI half-width over seeds (Student t; "
          "mean only when n = 1). Avg: per-seed mean over benchmarks, then over seeds. Δ: difference of means "
          "with Welch's CI. before: Avg before training. gen. tokens, time: means over runs.", "", table, ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if failed:
        md += [f"Failed runs ({len(failed)}, not in the table):", ""] + [f"- {m}" for m in failed] + [""]
    if missing:
        md += [f"Missing runs ({len(missing)}, partial or never started):", ""] + [f"- {m}" for m in missing] + [""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]
    path.write_text("\n".join(md) + "\n")


def headline_of(runs: Sequence[Run]) -> str:
    """The metric the runs name as their headline (summary.json `headline_metric`) when they agree, else
    DEFAULT_METRIC (older runs, or a mix of protocols)."""
    named = {r.summary.get("headline_metric") for r in runs}
    return named.pop() if len(named) == 1 and None not in named else DEFAULT_METRIC


def report_from_runs(runs: list[Run], missing: list[str], out_dir: str | Path, metric: str | None = None,
                     source: str = ".", failed: Sequence[str] = ()) -> Report:
    """Aggregate runs into the table, report.md, report.csv and plots under out_dir (metric None: headline_of)."""
    if not runs:
        lost = [*failed, *missing]
        detail = f"; {len(lost)} job(s) without results: {'; '.join(lost)}" if lost else ""
        raise ReportError(f"no runs found under {source} (looked for summary.json){detail}")
    metric = metric or headline_of(runs)
    benches_main = sorted({r.benchmark for r in runs if _number(r.summary.get(metric)) is not None})
    columns = benches_main + sorted({b for r in runs for b in r.scores(metric)} - set(benches_main))
    if not columns:
        keys = sorted({k for r in runs for k, v in r.summary.items() if _number(v) is not None})
        raise ReportError(f"metric '{metric}' is in no summary.json; available: {', '.join(keys)}")
    arms = group_arms(runs)
    by_label = {a.label: a for a in arms}
    rows: list[Row] = []
    for arm in arms:
        rows += _arm_rows(arm, metric, columns)
        if arm.gpo and (base := by_label.get(arm.base_label)) is not None:
            rows += _delta_rows(arm, base, metric, columns)
    table = _table(arms, rows, metric, columns)
    notes = _duplicate_seed_notes(arms)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from gpo_exp.report.plots import plot_all  # matplotlib only when writing files

    pngs = plot_all(arms, out, metric)
    from gpo_exp.report.compare import compare  # equal rounds / equal tokens / AUC, paired deltas

    cmp = compare(arms, out)
    rows, pngs = rows + cmp.rows, pngs + cmp.pngs
    _write_csv(out / "report.csv", rows)
    _write_markdown(out / "report.md", source, metric, table + ("\n\n" + cmp.markdown if cmp.markdown else ""),
                    notes, missing, pngs, failed)
    return Report(table, rows, missing, [out / "report.md", out / "report.csv", *pngs], arms, notes, list(failed),
                  cmp.markdown)


def build_report(path: str | Path, out_dir: str | Path | None = None, metric: str | None = None) -> Report:
    """Collect runs under `path` and write report.md, report.csv and PNGs to out_dir (default: path)."""
    runs, missing, failed = collect_jobs(path)
    return report_from_runs(runs, missing, out_dir if out_dir is not None else path, metric, source=str(path),
                            failed=failed)
