"""`python -m gpo_exp.report PATH`: paper-style tables and plots from a run or multirun directory.

Every finished run leaves a `summary.json` (and `rounds.jsonl`) in its Hydra run directory. This
module walks PATH, groups runs into arms and writes into --out (default: PATH):

- report.md (the table is also printed): rows X, GPO-X and "Δ GPO-X vs X" in the paper's order
  (dpo, kto, simpo, orpo, ppo, grpo, then others); one column per benchmark, Avg, n, accuracy
  before training, generated tokens (mean) and wall time (mean).
  * A cell is mean ± half-width of the 95% Student-t CI over seeds; mean only when n = 1.
  * Avg: each seed's mean over all benchmark columns, then mean ± CI over the seeds that have
    every column (so correlated benchmarks are not treated as independent).
  * Δ: mean(GPO-X) - mean(X), CI by Welch: t(0.975, Welch-Satterthwaite df) * sqrt(s1²/n1 + s2²/n2).
    Unpaired, so it stays valid when the two arms ran different seeds; needs n >= 2 on both sides.
- report.csv, long format: kind (arm|delta), arm, benchmark, metric, mean, ci95, n, std.
  Delta rows have n = n_gpo + n_base and an empty std. Run-level metrics (tokens, time) have benchmark "".
- accuracy_vs_round.png, critical_steps.png, rollout_cost.png (see gpo_exp.report_plots).

Arms: base optimizer name (nice casing), prefixed "GPO-" when config.gpo.enabled. Runs are pooled only
when their configs differ in nothing but the seed (and settings that cannot change a result: logging,
progress bars, checkpoint keeping): any other differing key splits the arm and is named in its label,
e.g. "GPO-DPO (bisect)" or "DPO (optimizer.beta=0.5)".
Jobs without results are listed, never silently dropped: failed ones (summary.json with status
failed/diverged, with their one-line error), partial ones (`.hydra/` but no summary.json: killed or
still running) and, for a Hydra multirun, jobs of the sweep (multirun.yaml) that have no directory at all.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from gpo_exp.registry import check
from gpo_exp.rundir import flatten

DEFAULT_METRIC = "eval/accuracy_after"
AVG = "Avg"
ORDER = ("dpo", "kto", "simpo", "orpo", "ppo", "grpo")  # row order of the paper's tables
NICE = {"dpo": "DPO", "kto": "KTO", "simpo": "SimPO", "orpo": "ORPO", "ppo": "PPO", "grpo": "GRPO"}
RUN_METRICS = {"rollout/generated_tokens": "gen. tokens", "time/total_s": "time (s)"}  # extra table columns


class ReportError(RuntimeError):
    """Nothing to report on, or a source that cannot be read. The message is one line."""


# --- statistics ---------------------------------------------------------------------------------


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with `df` (real, > 0: Welch's df is not an integer) degrees of freedom."""
    from scipy.stats import t  # scipy only when statistics are computed

    check(0.5 <= p < 1, "p", p, "in [0.5, 1)")
    check(df > 0, "df", df, "> 0")
    return float(t.ppf(p, df))


@dataclass
class Stat:
    """Mean of some values with the 95% CI half-width (None when it is undefined, n < 2)."""

    mean: float
    ci95: float | None
    n: int
    std: float | None  # sample std (n - 1); None for n < 2 and for differences


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


# --- runs ---------------------------------------------------------------------------------------


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


def _natural_key(text: str) -> list[Any]:
    """Sort job dirs 2 before 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    """rounds.jsonl records; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def collect_runs(path: str | Path) -> tuple[list[Run], list[str]]:
    """Finished runs under `path` and labels of the jobs without results (failed, partial, never started)."""
    runs, missing, failed = collect_jobs(path)
    return runs, failed + missing


def _expected_jobs(root: Path) -> list[list[str]] | None:
    """The override list of every job of the basic-sweeper multirun whose multirun.yaml is in `root`."""
    conf = _read_yaml(root / "multirun.yaml")
    hydra = conf.get("hydra") if isinstance(conf, dict) else None
    if not isinstance(hydra, dict):
        return None
    sweeper = hydra.get("sweeper") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    params = sweeper.get("params") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "")) or not (task or params):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        lines = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
        parsed = OverridesParser.create().parse_overrides(lines)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - an unparsable sweep only loses the "never started" list
        return None


def _normal(overrides: Sequence[str]) -> frozenset[str] | None:
    """Overrides as Hydra's sweeper spells them (1e9 -> 1000000000.0), order-free, to match jobs to dirs."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
        return frozenset(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed)
    except Exception:  # noqa: BLE001 - not Hydra syntax: compare as written
        return frozenset(map(str, overrides))


def collect_jobs(path: str | Path) -> tuple[list[Run], list[str], list[str]]:
    """(finished runs, missing jobs, failed jobs) under `path`.

    Missing: a job dir with `.hydra/` but no summary.json (killed, partial), or a job of the multirun
    (multirun.yaml at `path`) that has no directory. Failed: summary.json with status failed/diverged."""
    root = Path(path)
    if not root.is_dir():
        raise ReportError(f"not a directory: {root}")
    dirs = {p.parent for p in root.rglob("summary.json") if p.is_file()}
    dirs |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    runs, missing, failed = [], [], []
    seen_jobs: set[frozenset[str] | None] = set()
    for d in sorted(dirs, key=lambda d: _natural_key(d.relative_to(root).as_posix())):
        rel = d.relative_to(root).as_posix()
        overrides = _read_yaml(d / ".hydra" / "overrides.yaml")
        if isinstance(overrides, list):
            seen_jobs.add(_normal(overrides))
        label = f"{' '.join(map(str, overrides))} ({rel})" if isinstance(overrides, list) and overrides else rel
        try:
            summary = json.loads((d / "summary.json").read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            missing.append(label)
            continue
        except (OSError, ValueError):
            missing.append(f"{label} [unreadable summary.json]")
            continue
        status = summary.get("status", "ok")
        if status not in ("ok", "no_signal"):  # no_signal finished: its accuracies are those of a policy never trained
            where = f", round {summary['diverged_round']}" if summary.get("diverged_round") is not None else ""
            failed.append(f"{label} [{status}{where}: {summary.get('error') or 'no error recorded'}]")
            continue
        config = summary.get("config")
        if not isinstance(config, dict):  # older runs: fall back to Hydra's saved config
            config = _read_yaml(d / ".hydra" / "config.yaml") or {}
        runs.append(Run(rel, summary, config, _read_rounds(d / "rounds.jsonl")))
    for job in _expected_jobs(root) or []:
        if _normal(job) not in seen_jobs:
            missing.append(f"{' '.join(job)} [never started: no job directory]")
    return runs, missing, failed


def collect_wandb_runs(project: str) -> tuple[list[Run], list[str]]:
    """Runs of a wandb project (summary and config in the summary.json key scheme); no rounds."""
    try:
        import wandb

        wandb_runs = list(wandb.Api(timeout=20).runs(project))
    except Exception as e:  # no network, no login, unknown project: all end the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReportError(f"could not read wandb project '{project}': {first}") from None
    runs, missing = [], []
    for wr in wandb_runs:
        if wr.state != "finished":
            missing.append(f"{wr.name} [state: {wr.state}]")
            continue
        summary = {k: v for k, v in wr.summary_metrics.items() if not k.startswith("_")}
        runs.append(Run(wr.name, summary, dict(wr.config)))
    return runs, missing


# --- arms ---------------------------------------------------------------------------------------


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


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


# Settings that cannot change a run's numbers: runs differing only in these (and the seed) are pooled.
NEUTRAL_KEYS = ("seed", "name", "resume", "logger", "trainer.progress_bar", "trainer.save_checkpoint",
                "trainer.keep_checkpoints", "trainer.cpu_threads", "engine.batch_size", "warm_start.cache_dir",
                "hydra")


def _neutral(key: str, gpo: bool) -> bool:
    if not gpo and key.startswith("estimator."):  # the baseline runs no estimator
        return True
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def varying_keys(runs: Sequence[Run], gpo: bool) -> list[str]:
    """Config keys (dotted) whose values differ between `runs`, other than the seed and neutral settings."""
    flats = [flatten(run.config) for run in runs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if not _neutral(k, gpo) and len({_show(f.get(k)) for f in flats}) > 1]


K_ESTIMATORS = ("mc", "bisect")  # estimators whose K (draws per probed prefix) labels the arm


def group_arms(runs: Iterable[Run]) -> list[Arm]:
    """Arms in table order: per base optimizer X, then GPO-X variants (most runs first). Runs whose configs
    differ in anything but the seed are never pooled: each differing key splits the arm and is in its label."""
    groups: dict[tuple[str, bool], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.base, run.gpo)].append(run)
    arms: list[Arm] = []
    for (base, gpo), members in groups.items():
        nice = ("GPO-" if gpo else "") + NICE.get(base, base.upper())
        extra = [k for k in varying_keys(members, gpo) if k not in ("estimator.name", "estimator.k")]
        variants: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[Run]] = defaultdict(list)
        for run in members:  # the estimator only matters, and only splits rows, for GPO arms
            flat = flatten(run.config)
            fields = tuple((k, _show(flat.get(k))) for k in extra)
            key = ((str(run.cfg("estimator.name", "?")), str(run.cfg("estimator.k", "?"))) if gpo else ("", "")) + (fields,)
            variants[key].append(run)
        vary_name = len({name for name, _, _ in variants}) > 1
        vary_k = len({k for _, k, _ in variants}) > 1
        for (name, k, fields), vruns in variants.items():
            show_k = vary_k and name in K_ESTIMATORS  # random/confidence have no K; adaptive's is only its mc fallback
            parts = ([name] if vary_name else []) + ([f"K={k}"] if show_k else [])
            parts += [f"{f.removeprefix('estimator.')}={v}" for f, v in fields]
            arms.append(Arm(nice + (f" ({', '.join(parts)})" if parts else ""), base, gpo, vruns))
    rank = {name: i for i, name in enumerate(ORDER)}
    arms.sort(key=lambda a: (rank.get(a.base, len(ORDER)), a.base, a.gpo, -len(a.runs), a.label))
    return arms


# --- table --------------------------------------------------------------------------------------


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
    comparison: str = ""  # equal rounds / equal tokens table (gpo_exp.report_compare), printed under the table

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
    from gpo_exp.report_plots import plot_all  # matplotlib only when writing files

    pngs = plot_all(arms, out, metric)
    from gpo_exp.report_compare import compare  # equal rounds / equal tokens / AUC, paired deltas

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpo_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="a run or Hydra multirun directory")
    parser.add_argument("--out", help="output directory (default: PATH, or ./report-<project> for wandb)")
    parser.add_argument("--metric", default=None, help="summary.json key for the table cells (default: the runs' "
                        f"headline_metric, else {DEFAULT_METRIC})")
    parser.add_argument("--wandb-project", help="read runs from this wandb project (entity/project) instead")
    args = parser.parse_args(argv)
    if (args.path is None) == (args.wandb_project is None):
        parser.error("give exactly one of PATH or --wandb-project")
    try:
        if args.wandb_project:
            runs, missing = collect_wandb_runs(args.wandb_project)
            out = args.out or f"report-{args.wandb_project.replace('/', '-')}"
            report = report_from_runs(runs, missing, out, args.metric, source=f"wandb:{args.wandb_project}")
        else:
            report = build_report(args.path, args.out, args.metric)
    except ReportError as e:
        print(e, file=sys.stderr)
        return 1
    print(report.table_markdown)
    if report.comparison:
        print("\n" + report.comparison)
    for note in report.notes:
        print(f"note: {note}")
    if report.failed:
        print(f"\nfailed runs ({len(report.failed)}, not in the table):")
        print("\n".join(f"  {m}" for m in report.failed))
    if report.missing:
        print(f"\nmissing runs ({len(report.missing)}, partial or never started):")
        print("\n".join(f"  {m}" for m in report.missing))
    print("\nwrote: " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
