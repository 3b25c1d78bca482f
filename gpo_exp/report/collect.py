"""Runs read back from a directory tree (or a wandb project), and grouped into arms.

Runs are pooled into one arm only when their configs differ in nothing but the seed (and settings
that cannot change a result); any other differing key splits the arm and is named in its label.
Jobs without results are listed, never silently dropped.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from gpo_exp.report.types import NICE, ORDER, Arm, ReportError, Run
from gpo_exp.training.rundir import flatten


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


def _read_row_correct(rounds_dir: Path) -> dict[int, str]:
    """Round -> '0'/'1' per diagnosed test row, from rounds/roundNNN_eval.jsonl (testbed runs)."""
    out = {}
    for path in sorted(rounds_dir.glob("round*_eval.jsonl")) if rounds_dir.is_dir() else []:
        m = re.fullmatch(r"round(\d+)_eval\.jsonl", path.name)
        if m is None:  # the glob also matches e.g. roundX_eval.jsonl
            continue
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            out[int(m.group(1))] = "".join(str(int(r["greedy_correct"])) for r in rows)
        except (OSError, ValueError, KeyError, TypeError):  # a torn file (a killed run): no paired rows for it
            continue
    return {r: v for r, v in out.items() if v}


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
        runs.append(Run(rel, summary, config, _read_rounds(d / "rounds.jsonl"), _read_row_correct(d / "rounds")))
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


ABSENT = "unset"  # a key this run's config does not have (e.g. an estimator field of another estimator)


def _part(key: str, value: str, width: int = 28) -> str:
    """`key=value` for a label, estimator keys without their prefix, long values shortened."""
    value = value if len(value) <= width else value[: width - 1] + "…"
    return f"{key.removeprefix('estimator.')}={value}"


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
            fields = tuple((k, _show(flat[k]) if k in flat else ABSENT) for k in extra)
            key = ((str(run.cfg("estimator.name", "?")), str(run.cfg("estimator.k", "?"))) if gpo else ("", "")) + (fields,)
            variants[key].append(run)
        vary_name = len({name for name, _, _ in variants}) > 1
        vary_k = len({k for _, k, _ in variants}) > 1
        # A key names an arm only where it tells arms apart: it has two different values among the arms that
        # set it. A key only some arms have (adaptive's `grow` next to mc) is implied by what else differs.
        present: dict[str, set[str]] = defaultdict(set)
        for _, _, fields in variants:
            for f, v in fields:
                if v is not ABSENT:
                    present[f].add(v)
        telling = {f for f, vals in present.items() if len(vals) > 1}
        labels: dict[tuple[str, str, tuple[tuple[str, str], ...]], str] = {}
        for name, k, fields in variants:
            show_k = vary_k and name in K_ESTIMATORS  # random/confidence have no K; adaptive's is only its mc fallback
            parts = ([name] if vary_name else []) + ([f"K={k}"] if show_k else [])
            parts += [_part(f, v) for f, v in fields if f in telling and v is not ABSENT]
            labels[(name, k, fields)] = nice + (f" ({', '.join(parts)})" if parts else "")
        taken = list(labels.values())
        for key, label in labels.items():  # still ambiguous: name every key that differs
            if taken.count(label) > 1:
                name, k, fields = key
                parts = [p for p in (name if vary_name else "", f"K={k}" if vary_k and name in K_ESTIMATORS else "") if p]
                labels[key] = nice + f" ({', '.join(parts + [_part(f, v) for f, v in fields])})"
        arms += [Arm(labels[key], base, gpo, vruns) for key, vruns in variants.items()]
    rank = {name: i for i, name in enumerate(ORDER)}
    arms.sort(key=lambda a: (rank.get(a.base, len(ORDER)), a.base, a.gpo, -len(a.runs), a.label))
    return arms
