"""The paper's setting: the sampled eval protocol and truncation counts through a real (tiny) run."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from gpo_exp.config import validate
from gpo_exp.run import apply_fast_dev_run, train


def _run(compose, tmp_path, overrides):
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false",
                    "trainer.save_checkpoint=false", *overrides])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    return cfg, train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))


def test_sampled_protocol_names_its_headline_and_truncations_are_logged(compose, tmp_path):
    """No greedy decoding; headline = sampled pass@1; a 12-token limit cuts arith answers off and is counted."""
    from gpo_exp.report import build_report

    _, summary = _run(compose, tmp_path / "run", ["trainer.eval_protocol=sampled", "engine.max_new_tokens=12",
                                                  "trainer.eval_rows=4", "gpo.prompts_per_round=4"])
    assert summary["headline_metric"] == "eval/sampled_accuracy_after"
    assert summary["eval/accuracy_after"] is None and 0.0 <= summary["eval/sampled_accuracy_after"] <= 1.0
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert "eval/accuracy" not in rounds[0] and rounds[0]["eval/truncated"] > 0.5
    r1 = rounds[1]
    assert r1["rollout/truncated"] == round(r1["rollout/truncated_fraction"] * r1["rollout/trajectories"])
    assert r1["rollout/truncated_fraction"] > 0.5  # "Q: 7,+5,-3,*4" needs ~40 characters
    assert "gpo/estimation_truncated" in r1 and "gpo/candidates_truncated" in r1
    report = build_report(tmp_path)  # the report reads the headline the run names
    assert {r.metric for r in report.rows if r.benchmark == "arith"} >= {"eval/sampled_accuracy_after"}
