"""The round-cost calculator: its formulas, the paper-setting table, and a prediction checked on a real run."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gpo_exp.bench.round_cost import Setting, main, round_tokens
from gpo_exp.training.run_config import validate
from gpo_exp.run import apply_fast_dev_run, train


def _setting(**kw) -> Setting:
    base = dict(prompts=2, samples=2, reset_samples=2, k=4, explore_all=False, reuse_siblings=False, eval_rows=3,
                eval_generations=2, max_new_tokens=200, mean_tokens=100.0, accuracy=0.5, steps=3.0)
    return Setting(**{**base, **kw})


def test_mc_round_by_hand():
    """2 prompts x 2 samples of 100 tokens, half fail (2 explored), 3 steps, K=4, M=2."""
    t = round_tokens(_setting(), "mc")
    # estimation: prefixes 1, 2 of each explored trajectory: 4 x (67 + 33) = 400 each, plus the prompt's
    # 4 draws once per prompt with a failure: 2 x (1 - 0.5^2) = 1.5 prompts x 400
    assert t == pytest.approx({"trajectories": 400, "estimation": 2 * 400 + 1.5 * 400, "reset": 2 * 2 * 100 * 4 / 6,
                               "eval": 600, "total": 400 + 1400 + 800 / 3 + 600})
    assert round_tokens(_setting(dedup=False), "mc")["estimation"] == pytest.approx(2 * 400 + 2 * 400)
    assert round_tokens(_setting(reuse_siblings=True), "mc")["estimation"] == pytest.approx(800 + 1.5 * 300)
    assert round_tokens(_setting(shared=0.5), "mc")["estimation"] == pytest.approx(400 + 600)
    base = round_tokens(_setting(), None)
    assert (base["estimation"], base["reset"], base["total"]) == (0.0, 0.0, 1000.0)
    assert round_tokens(_setting(), "confidence")["estimation"] == 0.0
    long = _setting(steps=8.0)
    assert 0 < round_tokens(long, "bisect")["estimation"] < round_tokens(long, "mc")["estimation"]


def test_paper_setting_table_and_memory(capsys):
    out = main(["experiment=paper_r1_7b_math", "--mean-tokens", "3000", "--accuracy", "0.8",
                "--tokens-per-s", "hf=500", "--tokens-per-s", "vllm=3363"])
    s = out["setting"]
    assert (s["prompts"], s["samples"], s["k"], s["steps"], s["eval_rows"], s["eval_generations"]) == (64, 4, 4, 30, 100, 4)
    mc = out["arms"]["mc"]
    assert mc["trajectories"] == 64 * 4 * 3000 and mc["eval"] == 100 * 4 * 3000
    assert round(mc["total"] / 1e6, 1) == 11.6 and round(out["arms"]["baseline"]["total"] / 1e6, 2) == 1.97
    assert out["memory_gb"]["weights"] == pytest.approx(15.2, abs=0.05)
    assert out["memory_gb"]["kv_cache"] == pytest.approx(28 * 2 * 4 * 128 * 2 * 64 * (512 + 8192) / 1e9)
    printed = capsys.readouterr().out
    assert "| mc | 768,000 |" in printed and "h/round @ vllm" in printed and "0.96" in printed


def test_prediction_from_a_real_tiny_round(compose, tmp_path):
    """L, p, n and prefix sharing measured by a run: the trajectory tokens are exact, the round within 35%
    (a one-round fast_dev_run on 8 prompts; docs/benchmarks.md checks the default 64-prompt round: 0.97)."""
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false",
                    "trainer.save_checkpoint=false"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    ratio = main(["--from-run", str(tmp_path)])["ratio"]
    assert ratio["trajectories"] == pytest.approx(1.0)
    assert 0.65 <= ratio["total"] <= 1.35, ratio


def test_token_budget_caps_estimation_and_reset_at_ratio_minus_one_trajectories():
    from dataclasses import replace

    s = Setting(prompts=8, samples=4, reset_samples=4, k=4, explore_all=False, reuse_siblings=False, eval_rows=0,
                eval_generations=1, max_new_tokens=64, mean_tokens=40, accuracy=0.3, steps=6)
    free = round_tokens(s, "mc")
    capped = round_tokens(replace(s, max_token_ratio=2.0), "mc")
    assert free["estimation"] + free["reset"] > free["trajectories"]  # the paper's round: far over 2x
    assert capped["estimation"] + capped["reset"] == pytest.approx(capped["trajectories"])
    assert capped["estimation"] / capped["reset"] == pytest.approx(free["estimation"] / free["reset"])
    assert round_tokens(replace(s, max_token_ratio=100.0), "mc") == free  # a budget not reached changes nothing
