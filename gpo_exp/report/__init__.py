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
- accuracy_vs_round.png, critical_steps.png, rollout_cost.png (gpo_exp.report.plots) and
  accuracy_vs_tokens.png with the equal-rounds / equal-tokens comparison (gpo_exp.report.compare).

Arms: base optimizer name (nice casing), prefixed "GPO-" when config.gpo.enabled. Runs are pooled only
when their configs differ in nothing but the seed (and settings that cannot change a result: logging,
progress bars, checkpoint keeping): any other differing key splits the arm and is named in its label,
e.g. "GPO-DPO (bisect)" or "DPO (optimizer.beta=0.5)".
Jobs without results are listed, never silently dropped: failed ones (summary.json with status
failed/diverged, with their one-line error), partial ones (`.hydra/` but no summary.json: killed or
still running) and, for a Hydra multirun, jobs of the sweep (multirun.yaml) that have no directory at all.

The package, bottom up: types (Run, Arm, Row, Stat) <- stats (CIs) <- collect (runs and arms)
<- compare (equal rounds / equal tokens) and plots (figures) <- table (report.md, report.csv) <- here (CLI).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from gpo_exp.report.collect import collect_jobs, collect_runs, collect_wandb_runs, group_arms, varying_keys
from gpo_exp.report.stats import summarize, t_quantile, welch_diff
from gpo_exp.report.table import Report, build_report, report_from_runs
from gpo_exp.report.types import DEFAULT_METRIC, Arm, ReportError, Row, Run, Stat

__all__ = ["Arm", "Report", "ReportError", "Row", "Run", "Stat", "build_report", "collect_jobs", "collect_runs",
           "collect_wandb_runs", "group_arms", "main", "report_from_runs", "summarize", "t_quantile", "varying_keys",
           "welch_diff"]


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
