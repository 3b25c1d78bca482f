"""Kill, resume, signals, refusals and DDP, as a user meets them: `python -m gpo_exp.run` in a subprocess.

The default suite keeps one kill-and-resume run (DPO) and the quick refusals; LoRA, GRPO, SIGTERM and
DDP on CPU are slow-marked (each is a few tiny runs of ~10-30 s on a loaded 2-core machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
# 5 rounds of a few prompts: seconds per round, so a kill can land inside round 3.
SMALL = ["trainer.rounds=5", "gpo.prompts_per_round=3", "gpo.examples_per_round=6", "trainer.eval_rows=6",
         "trainer.eval_samples=1", "estimator.k=2", "logger.wandb=false", "trainer.progress_bar=false",
         "trainer.keep_checkpoints=2"]


def _cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "gpo_exp.run", *overrides]


def _run(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*overrides), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rounds(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()]


def _weights(d: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict()


def _kill_in_round(run_dir: Path, overrides: list[str], r: int) -> None:
    """Start a run and SIGKILL it once round r's data is on disk (round r is then training or evaluating)."""
    proc = subprocess.Popen(_cmd(*overrides, f"hydra.run.dir={run_dir}"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "rounds" / f"round{r:03d}_examples.jsonl"  # written after the trajectories: both are on disk
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, f"run ended before round {r}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_resume_and_compare(tmp_path: Path, extra: list[str]) -> None:
    overrides = [*SMALL, *extra]
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(_cmd(*overrides, f"hydra.run.dir={full}"), cwd=ROOT, env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_in_round(killed, overrides, 3)
    from gpo_exp.training.checkpoint import latest

    assert latest(killed)[0] == 2 and not (killed / "summary.json").exists()  # killed inside round 3
    assert (killed / "rounds" / "round003_examples.jsonl").exists()  # the killed round's partial files
    resumed = _run(f"resume={killed}")
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _rounds(full), _rounds(killed)
    assert [x["round"] for x in b] == [0, 1, 2, 3, 4, 5]  # one line per round: the killed round's line is gone
    assert [x["eval/accuracy"] for x in a] == [x["eval/accuracy"] for x in b]
    assert [x["rollout/generated_tokens"] for x in a] == [x["rollout/generated_tokens"] for x in b]
    for r in range(1, 6):  # every round's data is what the uninterrupted run generated
        for kind in ("trajectories", "examples"):
            name = f"rounds/round{r:03d}_{kind}.jsonl"
            assert (full / name).read_text() == (killed / name).read_text(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    assert sb["resumed_from_round"] == 2 and sb["status"] == "ok"
    # teacher-forced probabilities read the weights directly, so they carry the weights' ~1e-6 rounding
    forced = ("eval/diag/p_mistake_before", "eval/diag/p_mistake_after")
    same = lambda s: {k: v for k, v in s.items()  # noqa: E731
                      if not k.startswith("time/") and k != "resumed_from_round" and k not in forced}
    assert same(sa) == same(sb)
    for k in forced:
        assert (k in sa) == (k in sb) and sb.get(k) == pytest.approx(sa.get(k), abs=1e-5), k
    wa, wb = _weights(full), _weights(killed)
    # Resuming twice from one checkpoint is bit-identical; against the uninterrupted process the float
    # rounding of a step differs by ~1 ulp, which training amplifies: ~1.2e-6 after three rounds at lr 1e-5
    # (experiment=arith_clean), 1.1e-5 at the testbed's lr 5e-5 on this CPU; the bound is 3x the latter.
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 3e-5
    assert not (killed / "resume").exists()  # finished with its final weights: the resume checkpoints are spent


def test_sigkill_in_round_3_then_resume_equals_an_uninterrupted_run(tmp_path):
    _kill_resume_and_compare(tmp_path, [])


@pytest.mark.slow
def test_sigkill_and_resume_with_lora(tmp_path):
    _kill_resume_and_compare(tmp_path, ["model.lora_r=4", "optimizer.lr=1e-3"])


@pytest.mark.slow
def test_sigkill_and_resume_with_grpo(tmp_path):
    _kill_resume_and_compare(tmp_path, ["optimizer=grpo"])


def _start_and_wait(run_dir: Path, marker: Path) -> subprocess.Popen:
    """A SMALL run in `run_dir`, returned once `marker` exists (the point where the test signals it)."""
    proc = subprocess.Popen(_cmd(*SMALL, f"hydra.run.dir={run_dir}"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not marker.exists():
        assert proc.poll() is None
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigterm_stops_after_the_round_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_and_wait(run_dir, run_dir / "rounds" / "round002_trajectories.jsonl")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    line = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert line == [f"stopped by SIGTERM after round 2; continue with: python -m gpo_exp.run resume={run_dir}"]
    from gpo_exp.training.checkpoint import latest

    assert latest(run_dir)[0] == 2 and not (run_dir / "summary.json").exists()
    assert _run(f"resume={run_dir}").returncode == 0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 5


def _finished_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[bytes, int]]]:
    d = tmp_path / "done"
    (d / ".hydra").mkdir(parents=True)
    for name, text in (("summary.json", '{"status": "ok"}'), (".hydra/config.yaml", "seed: 0\n"),
                       (".hydra/overrides.yaml", "- seed=0\n"), ("run.log", "old log\n")):
        (d / name).write_text(text)
    return d, {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def test_a_refused_rerun_touches_nothing_in_the_finished_run(tmp_path):
    d, before = _finished_dir(tmp_path)
    proc = _run("trainer.rounds=2", f"hydra.run.dir={d}", timeout=120)
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    after = {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}
    assert after == before  # not .hydra/, not run.log


def test_a_config_error_is_one_line_and_leaves_no_directory(tmp_path):
    t0 = time.perf_counter()
    proc = _run("trainer.rounds=0", f"hydra.run.dir={tmp_path / 'new' / 'run'}", timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2 and proc.stderr == "error: bad config trainer.rounds=0: must be >= 1\n"
    assert not (tmp_path / "new").exists()
    print(f"config error after {elapsed:.1f}s")


def test_config_validation_imports_neither_transformers_nor_lightning():
    """What makes a config error fast: run.py validates before the heavy imports."""
    code = ("import sys, gpo_exp.run; from gpo_exp.training.run_config import validate; "
            "print(sorted(m for m in ('transformers', 'pytorch_lightning', 'peft', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.slow
def test_ddp_on_cpu_matches_one_process(tmp_path):
    """trainer.devices=2 trainer.strategy=ddp (gloo): the same round data as one process, files written once."""
    args = [*SMALL[1:], "trainer.rounds=2", "trainer.accelerator=cpu"]
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert _run(*args, f"hydra.run.dir={one}").returncode == 0
    proc = _run(*args, "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={ddp}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (1, 2):
        for kind in ("trajectories", "examples"):
            name = f"rounds/round{r:03d}_{kind}.jsonl"
            assert sorted((one / name).read_text().splitlines()) == sorted((ddp / name).read_text().splitlines())
    a, b = _rounds(one), _rounds(ddp)
    assert [x["round"] for x in b] == [0, 1, 2]  # one line per round, not one per rank
    assert [x["eval/accuracy"] for x in a] == [x["eval/accuracy"] for x in b]
    ratio = [y["time/rollout_s"] / x["time/rollout_s"] for x, y in zip(a[1:], b[1:])]
    print(f"ddp/1-process generation wall time per round: {ratio}")


@pytest.mark.slow
def test_a_multirun_of_bad_and_colliding_arms(tmp_path):
    """-m optimizer.beta=0.1,0.5 estimator.k=0,2: four directories, two failed with their line, two finished."""
    sweep = tmp_path / "sweep"
    proc = _run("-m", "optimizer.beta=0.1,0.5", "estimator.k=0,2", "trainer.fast_dev_run=true", "logger.wandb=false",
                "trainer.progress_bar=false", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    summaries = {p.parent.relative_to(sweep).as_posix(): json.loads(p.read_text()) for p in sweep.rglob("summary.json")}
    status = {k: (v["status"], v.get("error")) for k, v in summaries.items()}
    assert status == {
        "gpo-dpo_mc-k0/arith/optimizer.beta=0.1,trainer.fast_dev_run=True/seed0":
            ("failed", "ConfigError: bad config estimator.k=0: must be >= 1"),
        "gpo-dpo_mc-k0/arith/optimizer.beta=0.5,trainer.fast_dev_run=True/seed0":
            ("failed", "ConfigError: bad config estimator.k=0: must be >= 1"),
        "gpo-dpo_mc-k2/arith/optimizer.beta=0.1,trainer.fast_dev_run=True/seed0": ("ok", None),
        "gpo-dpo_mc-k2/arith/optimizer.beta=0.5,trainer.fast_dev_run=True/seed0": ("ok", None)}
    assert summaries["gpo-dpo_mc-k2/arith/optimizer.beta=0.5,trainer.fast_dev_run=True/seed0"]["config"]["optimizer"]["beta"] == 0.5
    rep = subprocess.run([sys.executable, "-m", "gpo_exp.report", str(sweep)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0
    assert "GPO-DPO (optimizer.beta=0.1)" in rep.stdout and "GPO-DPO (optimizer.beta=0.5)" in rep.stdout
    assert "failed runs (2" in rep.stdout and rep.stdout.count("bad config estimator.k=0") == 2


@pytest.mark.slow
def test_ctrl_c_prints_where_the_partial_run_is(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_and_wait(run_dir, run_dir / "resume" / "round001.ckpt")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in out + err
    lines = [ln for ln in out.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and f"resume={run_dir}" in lines[0] and "after round" in lines[0]
    assert _run(f"resume={run_dir}").returncode == 0
