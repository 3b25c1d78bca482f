"""End-to-end smoke runs of the GPO loop on the embedded default (seconds, with the shipped warm start)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from gpo_exp.training.run_config import validate
from gpo_exp.run import apply_fast_dev_run, train


def _run(compose, tmp_path, overrides):
    # the clean setting: these checks were calibrated on it (test_testbed_run covers the default testbed)
    dcfg = compose(["experiment=arith_clean", "trainer.fast_dev_run=true", "logger.wandb=false",
                    "trainer.progress_bar=false", *overrides])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    summary = train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    return cfg, summary


def _warm_start_params(cfg):
    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.training.warmstart import warm_start
    from dataclasses import asdict

    model, _, info = warm_start(cfg.model, BENCHMARKS.build(asdict(cfg.benchmark)), cfg.warm_start)
    return {k: v.clone() for k, v in model.state_dict().items()}, info


def test_gpo_dpo_round_builds_prefix_sharing_pairs_and_changes_the_policy(compose, tmp_path):
    cfg, summary = _run(compose, tmp_path, [])
    assert summary["warm_start/source"] in ("shipped", "cache")
    assert summary["gpo/pairs"] > 0 and summary["rounds"] == 1
    assert summary["gpo/explored"] > 0 and sum(summary["gpo/critical_step_hist"]) == summary["gpo/explored"]
    assert summary["rollout/generated_tokens"] > 0
    # saved round data: every explored trajectory has V_0..V_n and its critical step
    trajs = [json.loads(l) for l in (tmp_path / "rounds" / "round001_trajectories.jsonl").read_text().splitlines()]
    explored = [t for t in trajs if t["status"] != "skipped"]
    assert explored and all(len(t["values"]) == len(t["steps"]) + 1 for t in explored)
    assert all(t["values"][-1] == t["reward"] for t in explored)
    assert all(len(t["step_min_logprob"]) == len(t["steps"]) and max(t["step_min_logprob"]) <= 0 for t in trajs)
    # a GPO pair shares its prefix: chosen and rejected start with the same text
    pairs = [json.loads(l) for l in (tmp_path / "rounds" / "round001_examples.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["gpo/pairs"] and any(p["prefix_len"] > 0 for p in pairs)
    for p in pairs:
        assert p["chosen"] != p["rejected"]
    # the policy moved away from the warm start
    before, _ = _warm_start_params(cfg)
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0
    assert (tmp_path / "summary.json").exists() and len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 2


def test_baseline_arm_builds_whole_trajectory_pairs(compose, tmp_path):
    _, summary = _run(compose, tmp_path, ["gpo.enabled=false"])
    assert summary["arm"] == "dpo" and summary["gpo/pairs"] > 0
    assert "gpo/critical_step_hist" not in summary
    pairs = [json.loads(l) for l in (tmp_path / "rounds" / "round001_examples.jsonl").read_text().splitlines()]
    assert all(p["prefix_len"] == 0 for p in pairs)


def test_a_finished_run_directory_is_never_overwritten(compose, tmp_path):
    from gpo_exp.registry import ConfigError

    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        _run(compose, tmp_path, [])
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_the_default_config_has_a_shipped_warm_start(compose):
    """`make run` must never retrain silently: the shipped checkpoint's key is the default config's key."""
    from dataclasses import asdict

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.training.warmstart import SHIPPED, warm_start

    cfg = validate(compose())
    cfg.warm_start.cache_dir = "/nonexistent-cache-dir"  # skip the user cache: only the shipped copy may answer
    _, _, info = warm_start(cfg.model, BENCHMARKS.build(asdict(cfg.benchmark)), cfg.warm_start)
    assert info["source"] == "shipped" and (SHIPPED / info["key"] / "done").exists()


def test_confidence_estimator_resets_without_estimation_rollouts(compose, tmp_path):
    _, summary = _run(compose, tmp_path, ["estimator=confidence"])
    assert summary["gpo/explored"] > 0 and summary["gpo/pairs"] > 0
    assert summary["gpo/rollouts_per_trajectory"] == 0 and summary["gpo/rollout_tokens_per_trajectory"] == 0
    assert summary["gpo/critical_agrees_first_error"] > 0.5  # the policy's least likely token marks its errors


def test_reference_agreement_is_logged_without_touching_the_run(compose, tmp_path):
    _, plain = _run(compose, tmp_path / "plain", ["estimator=adaptive"])
    _, with_ref = _run(compose, tmp_path / "ref", ["estimator=adaptive", "gpo.reference_k=4"])
    assert "gpo/critical_agrees_reference" not in plain
    assert 0.0 <= with_ref["gpo/critical_agrees_reference"] <= 1.0
    assert 0 < with_ref["gpo/reference_n"] <= with_ref["gpo/explored"]
    # the diagnostic draws its own samples: the training rollouts, pairs and result are unchanged
    for key in ("rollout/generated_tokens", "gpo/pairs", "gpo/critical_step_hist", "eval/accuracy_after"):
        assert with_ref[key] == plain[key], key
    rounds = [json.loads(l) for l in (tmp_path / "ref" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["gpo/reference_tokens"] > 0


def test_negative_reference_k_is_a_config_error():
    from gpo_exp.registry import ConfigError
    from gpo_exp.rollout.gpo_round import GPOConfig

    with pytest.raises(ConfigError, match="gpo.reference_k"):
        GPOConfig(reference_k=-1)


def test_micro_batches_give_the_same_training_run(compose, tmp_path):
    """optimizer.micro_batch_size=2 accumulates 4 micro-batches per step of 8: the logged step losses
    of a whole (one-round) run equal those of the unsplit run."""
    import csv

    def losses(sub, extra):
        _run(compose, tmp_path / sub, ["optimizer.batch_size=8", *extra])
        rows = list(csv.DictReader((tmp_path / sub / "csv" / "metrics.csv").open()))
        return [float(r["train/loss"]) for r in rows if r.get("train/loss")]

    whole, micro = losses("whole", []), losses("micro", ["optimizer.micro_batch_size=2"])
    assert len(whole) >= 1 and len(whole) == len(micro)
    assert micro == pytest.approx(whole, abs=1e-5)


def test_testbed_run_logs_the_trap_diagnostics(compose, tmp_path):
    """The default (noisy-teacher testbed) with its shipped warm start: diagnostics per round and in the summary."""
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    assert cfg.benchmark.trap == "sign" and cfg.trainer.eval_rows == 16
    summary = train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    assert summary["warm_start/source"] in ("shipped", "cache")
    assert summary["eval/diag/rows_before"] == 16 and summary["eval/rows"] == 16
    assert not any("greedy_correct" in k for k in summary)  # the per-row 0/1s have their own file per evaluation
    for r in (0, 1):
        lines = (tmp_path / "rounds" / f"round{r:03d}_eval.jsonl").read_text().splitlines()
        assert [json.loads(x)["row"] for x in lines] == list(range(16))
    after = [json.loads(x)["greedy_correct"] for x in (tmp_path / "rounds" / "round001_eval.jsonl").read_text().splitlines()]
    assert sum(after) / 16 == pytest.approx(summary["eval/diag/greedy_accuracy_after"])
    # the diagnostics' own greedy pass agrees with the evaluation's
    assert summary["eval/diag/greedy_accuracy_before"] == summary["eval/accuracy_before"]
    assert 0.3 < summary["eval/diag/p_mistake_before"] < 0.8  # the teacher's trap_p is 0.5
    shares = [summary[f"eval/diag/fail_{c}_before"] for c in ("trap", "collateral", "other")]
    assert sum(shares) == pytest.approx(1.0) and shares[0] > 0.5  # most greedy failures are the planted trap
    assert 0 <= summary["gpo/critical_is_pivot"] <= 1 and summary["gpo/pivot_n"] > 0
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert "eval/diag/p_mistake" in rounds[0] and rounds[1]["gpo/pivot_n"] == summary["gpo/pivot_n"]


def test_a_run_that_trains_on_nothing_says_so_every_round_and_ends_no_signal(compose, tmp_path, caplog):
    # No warm start: the untrained model never reaches an answer, so no group has a reward difference.
    with caplog.at_level("WARNING", logger="gpo_exp.training.rounds"):
        _, summary = _run(compose, tmp_path, ["warm_start.enabled=false"])
    assert summary["gpo/examples"] == 0
    assert summary["status"] == "no_signal"
    assert "train accuracy 0.00" in summary["hint"] and "experiment=smollm2_arith" in summary["hint"]
    warned = [r.getMessage() for r in caplog.records if "no training examples" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == [f"round {r + 1}" for r in range(summary["rounds"])]


def test_no_signal_hints_name_what_to_change():
    from gpo_exp.training.rounds import no_signal_hint

    assert "harder prompts" in no_signal_hint(1.0)
    assert "samples_per_prompt" in no_signal_hint(0.4) and "0.40" in no_signal_hint(0.4)
