"""What a run prints: an honest header, the rows behind an accuracy, one closed progress bar per round."""
from __future__ import annotations

from pathlib import Path

from gpo_exp.run import apply_fast_dev_run, print_table, progress_bar, run_header
from gpo_exp.training.run_config import validate


def test_header_says_what_each_arm_does(compose):
    gpo = validate(compose([]))
    assert run_header(gpo, Path("d")).startswith("arm gpo-dpo (GPO, critical step by mc (K=4)) | model tiny")
    base = validate(compose(["gpo.enabled=false"]))
    head = run_header(base, Path("d"))
    assert head.startswith("arm dpo (baseline: whole-trajectory examples from the prompt, no critical step)")
    assert "K=" not in head and "estimator" not in head
    conf = run_header(validate(compose(["estimator=confidence"])), Path("d"))
    assert "critical step by confidence)" in conf and "K=" not in conf


def test_fast_dev_run_says_how_much_it_evaluated(compose, capsys):
    cfg = validate(compose(["trainer.fast_dev_run=true"]))
    apply_fast_dev_run(cfg)
    assert "fast_dev_run: 1 round, 8 prompts, 16 test rows" in run_header(cfg, Path("d"))
    summary = {"arm": "gpo-dpo", "eval/accuracy_before": 0.25, "eval/accuracy_after": 0.5, "eval/rows": 16,
               "rounds": 1, "gpo/examples": 5, "rollout/generated_tokens": 100, "time/warmstart_s": 1,
               "time/rollout_s": 1, "time/train_s": 1, "time/eval_s": 1, "time/total_s": 4}
    print_table(summary, Path("d"))
    assert "0.250 -> 0.500 on 16 test rows" in capsys.readouterr().out


def test_one_progress_bar_per_round_closed_before_the_round_log(compose):
    (bar,) = progress_bar(validate(compose([])))
    assert bar._leave  # a new bar each round, closed (one line) when the round's training ends
    assert progress_bar(validate(compose(["trainer.progress_bar=false"]))) == []
