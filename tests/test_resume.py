"""Kill, resume, signals, refusals and DDP, as a user meets them: `python -m gpo_exp.run` in a subprocess.

A resumed run must equal the uninterrupted one exactly: per-round records, round files, summary, and
final weights bit for bit. The default suite keeps one kill (SIGKILL during round 3's evaluation) and
the quick refusals; the other kill points (data collection, training), SIGTERM, Ctrl-C, LoRA, GRPO and
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
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
# 5 rounds of a few prompts: seconds per round, so a kill can land inside round 3; 30 eval rows make
# the evaluation long enough (~1 s) to be killed in.
SMALL = ["trainer.rounds=5", "gpo.prompts_per_round=3", "gpo.examples_per_round=6", "trainer.eval_rows=30",
         "trainer.eval_samples=1", "estimator.k=2", "logger.wandb=false", "trainer.progress_bar=false",
         "trainer.keep_checkpoints=2"]
LORA = ["model.lora_r=4", "optimizer.lr=1e-3"]
GRPO = ["optimizer=grpo"]


def _cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "gpo_exp.run", *overrides]


def _run(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*overrides), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rounds(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()]


def _weights(d: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d / "checkpoint").state_dict()


def _untimed(record: dict) -> dict:
    """A rounds.jsonl record or summary without wall times (and the resume marker), which legitimately differ."""
    return {k: v for k, v in record.items() if not k.startswith("time/") and k != "resumed_from_round"}


def _log_says(d: Path, text: str) -> bool:
    return (d / "run.log").exists() and text in (d / "run.log").read_text()


# Where a run is killed: (marker polled until it holds, check on the killed directory that the kill landed there).
KILL_POINTS = {
    # round 2's checkpoint is written and round 3's data is being generated
    "collect": (lambda d: (d / "resume" / "round002.ckpt").exists(),
                lambda d: not (d / "rounds" / "round003_examples.jsonl").exists()),
    # round 3's data is on disk: its training step (or, the step being short, its evaluation) is running
    "train": (lambda d: (d / "rounds" / "round003_examples.jsonl").exists(),
              lambda d: len(_rounds(d)) == 3),
    # round 3 is trained and its evaluation is running (its record is not written yet)
    "eval": (lambda d: _log_says(d, "round 3 trained"),
             lambda d: len(_rounds(d)) == 3 and _log_says(d, "round 3 trained")),
}


def _start(run_dir: Path, overrides: list[str], marker, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """Start a run and return once `marker(run_dir)` holds (polled every 10 ms)."""
    proc = subprocess.Popen(_cmd(*overrides, f"hydra.run.dir={run_dir}"), cwd=ROOT, env=ENV,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not marker(run_dir):
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    return proc


def _uninterrupted(tmp_path_factory: pytest.TempPathFactory, extra: list[str]) -> Path:
    d = tmp_path_factory.mktemp("full") / "run"
    proc = _run(*SMALL, *extra, f"hydra.run.dir={d}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def full_dpo(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, [])


@pytest.fixture(scope="module")
def full_lora(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, LORA)


@pytest.fixture(scope="module")
def full_grpo(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, GRPO)


def assert_same_run(full: Path, resumed: Path) -> None:
    """Everything a run computes is identical: per-round records, every round's files, the summary, and the
    final weights bit for bit (torch.equal, no tolerance)."""
    a, b = _rounds(full), _rounds(resumed)
    assert [x["round"] for x in b] == [0, 1, 2, 3, 4, 5]  # one line per round: the killed round's line is gone
    assert [_untimed(x) for x in a] == [_untimed(x) for x in b]
    for r in range(1, 6):  # every round's data is what the uninterrupted run generated
        for kind in ("trajectories", "examples"):
            name = f"rounds/round{r:03d}_{kind}.jsonl"
            assert (full / name).read_text() == (resumed / name).read_text(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, resumed))
    assert sb["status"] == "ok" and sb["resumed_from_round"] is not None
    assert _untimed(sa) == _untimed(sb)
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert differing == [], f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    assert not (resumed / "resume").exists()  # finished with its final weights: the resume checkpoints are spent
    assert _csv(full) == _csv(resumed)  # metrics.csv: the rows kept from before the kill plus the resumed ones


def _csv(d: Path) -> list[dict]:
    """metrics.csv's rows without wall times, in order."""
    import csv

    with (d / "csv" / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/") and v != ""} for row in csv.DictReader(f)]


def _kill_resume_and_compare(full: Path, tmp_path: Path, extra: list[str], point: str) -> None:
    marker, landed = KILL_POINTS[point]
    killed = tmp_path / "killed"
    proc = _start(killed, [*SMALL, *extra], marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from gpo_exp.training.checkpoint import latest

    assert latest(killed)[0] == 2 and not (killed / "summary.json").exists()  # killed inside round 3
    assert landed(killed), f"the kill did not land in round 3's {point}"
    resumed = _run(f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Previous log files" not in resumed.stderr + resumed.stdout  # the kept csv rows are not deleted
    assert_same_run(full, killed)


def test_a_rounds_batches_are_fixed_however_often_the_loader_is_iterated():
    """What made resume drift: the order of a round's batches. It is drawn once from the round's seed, so
    iterating the loader again (as a resumed Lightning fit does) serves the same batches, and they are the
    batches a shuffling DataLoader with that seed gives on its first pass (the order runs always had)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from gpo_exp.training.datamodule import RolloutDataModule

    objective = SimpleNamespace(kind="pairs", cfg=SimpleNamespace(batch_size=3, epochs_per_round=1),
                                collate_step=lambda examples, pad: [e["i"] for e in examples])
    dm = RolloutDataModule(objective, pad_id=0, seed=7)
    dm.set_examples([{"i": i} for i in range(10)], 3)
    loader = dm.train_dataloader()
    first, again = list(loader), list(loader)
    assert first == again and sorted(i for b in first for i in b) == list(range(10))
    g = torch.Generator().manual_seed(7 * 1000 + 3)
    shuffled = DataLoader(list(range(10)), batch_size=3, shuffle=True, generator=g)
    assert first == [b.tolist() for b in shuffled]
    assert list(dm.train_dataloader()) == first  # a rebuilt loader too


def test_sigkill_during_round_3_eval_then_resume_is_bit_identical(full_dpo, tmp_path):
    _kill_resume_and_compare(full_dpo, tmp_path, [], "eval")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["collect", "train"])
def test_sigkill_during_round_3_then_resume_is_bit_identical(full_dpo, tmp_path, point):
    _kill_resume_and_compare(full_dpo, tmp_path, [], point)


@pytest.mark.slow
def test_sigkill_and_resume_with_lora_is_bit_identical(full_lora, tmp_path):
    _kill_resume_and_compare(full_lora, tmp_path, LORA, "eval")


@pytest.mark.slow
def test_sigkill_and_resume_with_grpo_is_bit_identical(full_grpo, tmp_path):
    _kill_resume_and_compare(full_grpo, tmp_path, GRPO, "collect")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_then_resume_is_bit_identical(full_dpo, tmp_path, sig, code):
    """SIGTERM stops after round 2's checkpoint with exit code 143 (128 + 15); Ctrl-C stops at once with 130.
    Either way the resumed run equals the uninterrupted one."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, SMALL, lambda d: (d / "rounds" / "round002_trajectories.jsonl").exists(),
                  stdout=subprocess.PIPE)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in out + err
    if sig == signal.SIGTERM:
        line = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM")]
        assert line == [f"stopped by SIGTERM after round 2; continue with: python -m gpo_exp.run resume={run_dir}"]
        from gpo_exp.training.checkpoint import latest

        assert latest(run_dir)[0] == 2 and not (run_dir / "summary.json").exists()
    else:
        lines = [ln for ln in out.splitlines() if ln.startswith("interrupted:")]
        assert len(lines) == 1 and f"resume={run_dir}" in lines[0]
    resumed = _run(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(full_dpo, run_dir)


def test_resume_of_a_run_whose_config_key_this_version_lacks_is_one_line(tmp_path):
    """A run started by another gpo_exp version, whose config has a key this one does not know."""
    import yaml

    d = tmp_path / "old"
    (d / ".hydra").mkdir(parents=True)
    cfg = yaml.safe_load(subprocess.run([sys.executable, "-m", "gpo_exp.run", "--cfg", "job", "--resolve"], cwd=ROOT,
                                        env=ENV, capture_output=True, text=True, timeout=120).stdout)
    cfg["trainer"]["eval_every"] = 2  # a key of another version
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text("[]\n")
    proc = _run(f"resume={d}", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot resume {d}: its saved config (.hydra/config.yaml) does not validate")
    assert "eval_every" in proc.stderr


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
