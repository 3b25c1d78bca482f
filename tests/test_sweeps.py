"""Sweeps (sweeps/, as +sweep=NAME), launchers, experiment and debug presets compose into the runs we expect.

Each sweep is expanded the way Hydra's basic sweeper does it, and every job is composed and validated,
so a typo in a sweep value fails here instead of hours into a multirun. The slow test runs the
`smoke` sweep end to end and reports on it.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from gpo_exp.config import register_configs
from gpo_exp.training.run_config import validate
from tests.conftest import CONF_DIR

ROOT = CONF_DIR.parent
SWEEPS = ROOT / "sweeps"
OPTS = ("dpo", "kto", "simpo", "orpo", "ppo", "grpo")
JOBS = {"main": 36, "reset": 15, "k": 15, "budget": 6, "smoke": 12, "probe_temperature": 9, "paper": 10,
        "testbed": 20, "testbed_optimizers": 70, "testbed_estimators": 20}  # grid sweeps -> number of runs
OPTUNA = "optuna"  # the one non-grid sweep (needs hydra-optuna-sweeper)
# Until the lead ships the warm-start checkpoint, a tiny warm start (20 steps of 16) keeps the slow test
# in minutes; accuracy is then ~0, which the test does not check.


@pytest.fixture(scope="module")
def hcompose():
    """compose(overrides) -> the config with its `hydra` node, as a launch would see it."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda overrides: hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()


def expand(cfg: DictConfig) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for `cfg.hydra.sweeper.params` (one override list each)."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


@pytest.fixture(scope="module")
def sweep_jobs(hcompose):
    """sweep_jobs(name) -> the config of every job of the sweep (cached).

    Composing takes ~0.2 s, so each distinct choice of config groups (optimizer=kto, ...) is composed
    once and the job's plain values (seed=1, gpo.enabled=true) are then set on a copy, as Hydra sets a
    command-line value on an existing key.
    """
    cache: dict[str, list[DictConfig]] = {}
    composed: dict[tuple[str, ...], DictConfig] = {}

    def jobs(sweep: str) -> list[DictConfig]:
        if sweep in cache:
            return cache[sweep]
        cache[sweep] = []
        for job in expand(hcompose([f"+sweep={sweep}"])):
            overrides = OverridesParser.create().parse_overrides(job)
            groups = tuple(o.input_line for o in overrides if (CONF_DIR / o.key_or_group).is_dir())
            if (sweep, *groups) not in composed:
                composed[(sweep, *groups)] = hcompose([f"+sweep={sweep}", *groups])
            cfg = copy.deepcopy(composed[(sweep, *groups)])
            for o in overrides:
                if o.input_line not in groups:
                    OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
            cache[sweep].append(cfg)
        return cache[sweep]

    return jobs


def test_every_sweep_file_has_an_expected_job_count():
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted([*JOBS, OPTUNA])
    assert (CONF_DIR / "sweep").resolve() == SWEEPS.resolve()  # +sweep=NAME reads sweeps/NAME.yaml


@pytest.mark.parametrize("sweep,n", sorted(JOBS.items()))
def test_sweep_expands_to_distinct_valid_runs(hcompose, sweep_jobs, sweep, n):
    cfg = hcompose([f"+sweep={sweep}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.logger.group == sweep
    assert cfg.hydra.sweep.dir.startswith(f"outputs/multirun/{sweep}/")
    jobs = sweep_jobs(sweep)
    assert len(jobs) == n
    subdirs = {c.hydra.sweep.subdir for c in jobs}
    assert len(subdirs) == n  # no two runs share a directory
    for c in jobs:
        validate(c)  # every job passes the run's own checks


def _arms(jobs: list[DictConfig]) -> set[tuple]:
    return {(c.name, c.estimator.name, c.estimator.get("k"), c.seed) for c in jobs}


def test_main_is_every_optimizer_with_and_without_gpo(sweep_jobs):
    jobs = sweep_jobs("main")
    opts = ["dpo", "kto", "simpo", "orpo", "ppo", "grpo"]
    assert _arms(jobs) == {(a, "mc", 4, s) for o in opts for a in (o, f"gpo-{o}") for s in (0, 1, 2)}
    assert {c.trainer.rounds for c in jobs} == {5} and {c.gpo.max_generated_tokens for c in jobs} == {None}


def test_paper_is_the_table_1_grid_on_r1_distill_7b(hcompose, sweep_jobs):
    jobs = sweep_jobs("paper")
    opts = ["dpo", "kto", "simpo", "orpo", "ppo"]
    assert _arms(jobs) == {(a, "mc", 4, 0) for o in opts for a in (o, f"gpo-{o}")}
    assert {(c.model.name, c.benchmark.name, c.trainer.eval_protocol, c.engine.temperature, c.engine.top_p)
            for c in jobs} == {("r1_distill_qwen_7b", "math", "sampled", 0.6, 0.95)}
    small = hcompose(["+sweep=paper", "experiment=paper_r1_1p5b_math"])  # the command line picks the 1.5B
    assert small.model.name == "r1_distill_qwen_1p5b" and small.gpo.prompts_per_round == 64


def test_reset_compares_estimators_on_gpo_dpo(sweep_jobs):
    jobs = sweep_jobs("reset")
    assert _arms(jobs) == {("gpo-dpo", e, k, s) for e, k in (("mc", 4), ("random", None), ("bisect", 4),
                                                               ("adaptive", 4), ("confidence", None))
                           for s in (0, 1, 2)}
    assert "gpo-dpo_random/arith/seed2" in {c.hydra.sweep.subdir for c in jobs}  # random has no K


def test_k_sweeps_mc_rollouts_per_prefix(hcompose, sweep_jobs):
    jobs = sweep_jobs("k")
    assert _arms(jobs) == {("gpo-dpo", "mc", k, s) for k in (2, 4, 8, 12, 16) for s in (0, 1, 2)}
    assert hcompose(["+sweep=k", "optimizer=kto"]).name == "gpo-kto"  # the command line still wins


def test_probe_temperature_sweeps_mc_probe_temperatures(sweep_jobs):
    jobs = sweep_jobs("probe_temperature")
    assert {(c.name, c.estimator.name, c.estimator.k, c.estimator.temperature, c.seed) for c in jobs} == {
        ("gpo-dpo", "mc", 4, t, s) for t in (None, 0.7, 0.5) for s in (0, 1, 2)}


def test_budget_arms_share_the_token_budget_and_the_baseline_can_reach_it(sweep_jobs):
    from gpo_exp.benchmarks import BENCHMARKS

    jobs = sweep_jobs("budget")
    assert _arms(jobs) == {(a, "mc", 4, s) for a in ("dpo", "gpo-dpo") for s in (0, 1, 2)}
    assert {(c.gpo.max_generated_tokens, c.trainer.rounds) for c in jobs} == {(200_000, 32)}
    # The cap must let the cheap baseline arm reach the budget with a 1.5x margin at reference length.
    cfg = validate(jobs[0])
    rows = BENCHMARKS.build(asdict(cfg.benchmark)).load("train")
    ref_len = sum(len(r["solution"]) + 1 for r in rows) / len(rows)  # characters + eos = tokens of the tiny model
    per_round = cfg.gpo.prompts_per_round * cfg.gpo.samples_per_prompt * ref_len
    assert cfg.trainer.rounds * per_round >= 1.5 * cfg.gpo.max_generated_tokens


def test_smoke_is_a_one_round_miniature_of_main(sweep_jobs):
    jobs = sweep_jobs("smoke")
    assert _arms(jobs) == {(a, "mc", 2, 0) for o in OPTS for a in (o, f"gpo-{o}")}
    c = validate(jobs[0])
    assert (c.trainer.rounds, c.gpo.prompts_per_round, c.gpo.samples_per_prompt, c.gpo.examples_per_round,
            c.trainer.eval_rows, c.trainer.eval_samples) == (1, 4, 2, 4, 8, 0)


@pytest.mark.parametrize("launcher,choice,target,settings", [
    ("local", "basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher", {}),
    ("joblib", "joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
     {"n_jobs": 4, "backend": "loky"}),
    ("slurm", "submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
     {"gpus_per_node": 1, "timeout_min": 240, "partition": None, "cpus_per_task": 8, "mem_gb": 32}),
])
def test_launcher_composes_with_a_sweep(hcompose, launcher, choice, target, settings):
    cfg = hcompose(["+sweep=main", f"+launcher={launcher}"])
    assert cfg.hydra.runtime.choices["hydra/launcher"] == choice
    cls = get_class(cfg.hydra.launcher._target_)  # the plugin is installed and its class imports
    assert f"{cls.__module__}.{cls.__name__}" == target
    assert {k: cfg.hydra.launcher[k] for k in settings} == settings
    assert len(expand(cfg)) == 36  # the launcher does not change the grid
    validate(cfg)


def test_launcher_files_are_the_tested_ones():
    assert sorted(p.stem for p in (CONF_DIR / "launcher").glob("*.yaml")) == ["joblib", "local", "slurm"]


def test_gpo_dpo_arith_is_the_clean_setting_made_explicit(hcompose):
    assert asdict(validate(hcompose(["experiment=gpo_dpo_arith"]))) == asdict(validate(hcompose(["experiment=arith_clean"])))


def test_the_default_is_the_testbed_and_arith_clean_the_old_default(hcompose):
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.training.warmstart import warm_start_key

    default, clean = validate(hcompose([])), validate(hcompose(["experiment=arith_clean"]))
    assert (default.benchmark.trap, default.benchmark.trap_p, default.benchmark.traps_per_chain) == ("sign", 0.5, 1)
    assert default.benchmark.sizes["test"] == 1000 and default.trainer.eval_rows is None
    assert (clean.benchmark.trap, clean.benchmark.sizes["test"], clean.trainer.eval_rows, clean.trainer.rounds,
            clean.optimizer.lr) == ("none", 300, 300, 5, 1e-5)
    key = lambda c: warm_start_key(c.model, c.benchmark, c.warm_start.resolved(pretrained=False))  # noqa: E731
    assert (key(default), key(clean)) == ("2d04acaadccffdee", "78e33c903bd90f55")  # both shipped


@pytest.mark.parametrize("overrides,expected", [
    (["experiment=smollm2_gsm_symbolic"], {"model.name": "smollm2_135m", "benchmark.name": "gsm_symbolic",
                                           "warm_start.lr": 2e-5, "trainer.rounds": 3, "trainer.eval_rows": 100}),
    (["experiment=budget_matched"], {"gpo.max_generated_tokens": 200_000, "trainer.rounds": 32, "name": "gpo-dpo"}),
    (["experiment=budget_matched", "gpo.enabled=false"], {"gpo.max_generated_tokens": 200_000, "name": "dpo"}),
    (["debug=fast"], {"trainer.fast_dev_run": True, "logger.wandb": False, "trainer.save_checkpoint": False}),
    (["debug=profile"], {"trainer.rounds": 1, "logger.wandb": False, "gpo.prompts_per_round": 64}),
])
def test_presets_set_their_values(hcompose, overrides, expected):
    cfg = validate(hcompose(overrides))
    got = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) if "." in k else getattr(cfg, k)
           for k in expected}
    assert got == expected


@pytest.mark.parametrize("path", sorted([*SWEEPS.glob("*.yaml"), *(CONF_DIR / "launcher").glob("*.yaml"),
                                         *(CONF_DIR / "experiment").glob("*.yaml"),
                                         *(CONF_DIR / "debug").glob("*.yaml")]), ids=lambda p: p.name)
def test_every_setting_is_commented(path):
    """One comment per setting: each `key: value` line says why, inline or on the line above."""
    text = path.read_text()
    assert text.startswith("# @package _global_\n")
    lines = text.splitlines()
    bare = [ln for prev, ln in zip(["", *lines], lines)
            if re.match(r"\s*(- )?[\w./]+:\s*\S", ln) and " # " not in ln and not prev.lstrip().startswith("#")]
    assert bare == []


def test_optuna_sweep_composes(hcompose):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install hydra-optuna-sweeper")
    cfg = hcompose([f"+sweep={OPTUNA}"])
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "optuna" and cfg.hydra.sweeper.direction == "maximize"
    assert dict(cfg.hydra.sweeper.params) == {"optimizer.lr": "tag(log, interval(1e-6, 5e-5))",
                                              "optimizer.beta": "interval(0.01, 0.5)"}
    assert (cfg.logger.group, cfg.hydra.sweeper.n_trials, cfg.hydra.sweeper.sampler.seed) == ("optuna", 32, 0)
    validate(cfg)


@pytest.mark.slow
def test_optuna_study_runs_trials_inside_the_bounds(tmp_path):
    """A 3-trial study with a stand-in objective (no training) numbers its trials and keeps the bounds."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install hydra-optuna-sweeper")
    # Stand-in for run.main: a float peaked at lr=1e-5, beta=0.1 (what optuna needs the task to return).
    script = tmp_path / "task.py"
    script.write_text(
        "import math, hydra\nfrom gpo_exp.config import register_configs\nregister_configs()\n"
        f"@hydra.main(version_base='1.3', config_path={str(CONF_DIR)!r}, config_name='config')\n"
        "def main(cfg):\n"
        "    return -abs(math.log10(cfg.optimizer.lr) + 5) - abs(cfg.optimizer.beta - 0.1)\n"
        "main()\n")
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), f"+sweep={OPTUNA}", "hydra.sweeper.n_trials=3",
                           "hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())["best_params"]
    assert 1e-6 <= best["optimizer.lr"] <= 5e-5 and 0.01 <= best["optimizer.beta"] <= 0.5
    assert sorted(p.name for p in (out / "gpo-dpo").iterdir()) == ["trial0", "trial1", "trial2"]


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    """`+sweep=smoke` as a user runs it: 12 runs with summaries, then a report with every arm and every delta."""
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "gpo_exp.run", "+sweep=smoke", "+launcher=local", f"hydra.sweep.dir={sweep_dir}",
           "logger.wandb=false"]  # the default warm start ships with the package
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    print(f"smoke sweep: {time.perf_counter() - t0:.0f}s")
    assert proc.returncode == 0, proc.stderr[-3000:]

    arms = [a for o in OPTS for a in (o, f"gpo-{o}")]
    for arm in arms:
        arm_dir = f"{arm}_mc-k2" if arm.startswith("gpo-") else arm  # a baseline arm carries no estimator name
        summary = json.loads((sweep_dir / arm_dir / "arith" / "seed0" / "summary.json").read_text())
        assert (summary["arm"], summary["status"], summary["rounds"]) == (arm, "ok", 1)
        assert summary["config"]["logger"]["group"] == "smoke" and summary["rollout/generated_tokens"] > 0
        assert ("gpo/critical_step_hist" in summary) == arm.startswith("gpo-")
    assert len(list(sweep_dir.rglob("summary.json"))) == 12

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "-m", "gpo_exp.report", str(sweep_dir), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    rows = [ln.split("|")[1].strip() for ln in rep.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    nice = ["DPO", "KTO", "SimPO", "ORPO", "PPO", "GRPO"]
    assert rows == ["Method"] + [r for n in nice for r in (n, f"GPO-{n}", f"Δ GPO-{n} vs {n}")]
    with (out / "report.csv").open() as f:
        assert {r["arm"] for r in csv.DictReader(f) if r["kind"] == "arm"} == {a for n in nice for a in (n, f"GPO-{n}")}
