"""Benchmark scripts: argument parsing and a fast pass of each harness with values checked."""
from __future__ import annotations

import math
import re

import pytest
from transformers import AutoModelForCausalLM

from gpo_exp.bench import estimators, offline_pairs, ref_logps
from gpo_exp.bench.estimators import parse_arms
from gpo_exp.training.warmstart import SHIPPED


def test_parse_arms_reads_names_and_typed_overrides():
    assert parse_arms("mc:k=4:reuse_siblings=false,adaptive:k_max=16:batch=2,random") == [
        ("mc", {"k": 4, "reuse_siblings": False}), ("adaptive", {"k_max": 16, "batch": 2}), ("random", {})]
    with pytest.raises(SystemExit, match="not key=value"):
        parse_arms("mc:k4")


def test_offline_pairs_at_lr_zero_leaves_accuracy_unchanged():
    # lr 0: the harness must not move the policy (no leak between arms, eval is deterministic)
    rows = offline_pairs.main(["--objectives", "dpo,sft", "--lrs", "0", "--steps", "2", "--batch", "4",
                               "--prompts", "8", "--test-rows", "12"])
    assert [r["objective"] for r in rows] == ["dpo", "sft"]
    assert all((r["greedy"], r["sampled"]) == (r["greedy_before"], r["sampled_before"]) for r in rows)
    assert all(r["dlogp_correct"] == 0 and r["dlogp_incorrect"] == 0 for r in rows)


def test_offline_pairs_sft_at_a_real_lr_moves_the_policy():
    rows = offline_pairs.main(["--objectives", "sft", "--lrs", "3e-2", "--steps", "3", "--batch", "8",
                               "--prompts", "4", "--test-rows", "12"])
    assert rows[0]["greedy"] < 0.5  # a huge lr wrecks the warm start (~0.84): training really happened


def test_ref_logps_bench_reports_both_ratios():
    out = ref_logps.main(["--pairs", "16", "--batch", "8"])
    assert out["step_ratio"] > 0 and out["total_ratio"] > 0
    assert out["steps/precomputed"] > 0 and out["steps/recomputed"] > 0


def test_ref_logps_bench_takes_an_hf_model_shape():
    """--hf-config builds a random model of a saved HF model's shape (here the shipped warm start's)."""
    shipped = next(p for p in SHIPPED.iterdir() if (p / "config.json").exists())
    out = ref_logps.main(["--hf-config", str(shipped), "--pairs", "8", "--batch", "4", "--repeats", "1",
                          "--threads", "1"])
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(shipped).parameters())
    assert out["params"] == expected and out["steps/precomputed"] > 0 and out["steps/recomputed"] > 0


def test_greedy_anchor_resets_each_greedy_failure_at_its_least_confident_step():
    from gpo_exp.benchmarks import get
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.training.warmstart import WarmStartConfig, warm_start

    bench = get("arith")
    base, tok, _ = warm_start(ModelConfig(), bench, WarmStartConfig())
    trajs, groups = offline_pairs.greedy_groups(base, tok, bench, bench.load("train")[:60], seed=1, temperature=1.0, m=3)
    failed = [t for t in trajs if t.reward == 0]
    assert len(trajs) == 60 and 0 < len(failed) == len(groups) < 30  # the warm start solves ~84% greedily
    for t, g in zip(failed, groups):
        conf = t.step_confidence()
        assert g.step == conf.index(min(conf)) and g.prefix_ids == t.completion_ids[: t.prefix_len(g.step)]
        assert len(g.continuations) == 4 and g.continuations[-1].reward == 0.0
        assert g.prefix_ids + g.continuations[-1].ids == t.completion_ids  # greedy's own continuation


def test_offline_pairs_set_needs_key_value():
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        offline_pairs.main(["--set", "beta", "--prompts", "1", "--test-rows", "1"])


def test_offline_pairs_rejects_ppo_with_the_allowed_list():
    with pytest.raises(SystemExit, match="ppo is not supported offline.*allowed: dpo"):
        offline_pairs.main(["--objectives", "dpo,ppo"])


def test_estimators_bench_without_reference_reports_nan_agreement():
    rows = estimators.main(["--prompts", "6", "--samples", "2", "--reference-k", "0", "--arms", "random"])
    assert math.isnan(rows[0]["agree_mc16"]) and rows[0]["tokens_per_traj"] == 0  # random spends no rollouts


def test_estimators_bench_shows_late_misses(capsys: pytest.CaptureFixture[str]):
    estimators.main(["--prompts", "20", "--samples", "2", "--reference-k", "0", "--arms", "random", "--show-misses", "2"])
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[random]")]
    assert len(shown) == 2  # deterministic for the seed: at most N, and this sample has more late misses
    for line in shown:
        first, crit = (int(x) for x in re.search(r"first wrong step (\d+), critical (\d+)", line).groups())
        assert crit > first


def test_mask_divergence_finds_the_first_differing_token_and_its_step():
    nl = 9
    chosen = [1, 2, 3, nl, 4, 5, nl, 6, nl]  # prompt [1, 2], then steps "3\n", "45\n", "6\n"
    rejected = [1, 2, 3, nl, 4, 7, 7, nl, 8, nl]  # goes wrong at index 5, inside the second step
    e = {"chosen": chosen, "rejected": rejected, "start": 2}
    offline_pairs.mask_divergence(e, nl, whole_step=False)
    assert (e["start"], e["chosen_end"], e["rejected_end"]) == (5, 6, 6)
    e = {"chosen": chosen, "rejected": rejected, "start": 2}
    offline_pairs.mask_divergence(e, nl, whole_step=True)
    assert (e["start"], e["chosen_end"], e["rejected_end"]) == (4, 7, 8)  # "45\n" vs "577\n"


def test_offline_pairs_mask_needs_pairwise_objectives():
    with pytest.raises(SystemExit, match="needs pairwise objectives, got kto.*allowed: dpo"):
        offline_pairs.main(["--objectives", "dpo,kto", "--mask", "divergence_token"])


def test_bench_device_and_hf_config_errors_are_one_line(tmp_path):
    from gpo_exp.bench import parse_device

    assert parse_device("cpu").type == "cpu"
    with pytest.raises(SystemExit, match="--device: 'gpu0' is not a device; allowed: cpu, cuda, cuda:N"):
        parse_device("gpu0")
    with pytest.raises(SystemExit, match="--hf-config: cannot read a config and tokenizer from"):
        ref_logps.main(["--hf-config", str(tmp_path / "missing"), "--pairs", "2"])


def test_memory_bench_new_path_is_smaller_and_prints_the_table(capsys: pytest.CaptureFixture[str]):
    from gpo_exp.bench import memory

    memory.main(["--vocab", "30000", "--lengths", "200", "400", "--ops", "precompute"])
    out = capsys.readouterr().out
    rows = re.findall(r"^precompute\s+30000\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x$", out, re.M)
    assert [int(r[0]) for r in rows] == [200, 400]
    # old: 4 sequences x T x 30k fp32 logits plus a log_softmax copy; new: one 128 MB-bounded block at a time
    assert all(float(r[3]) > 2.5 for r in rows) and int(rows[1][1]) > int(rows[0][1])
    assert int(rows[1][2]) < 1.5 * 128 + 64
    assert "new-path slope, precompute (MB per 1k tokens, T 200->400): V=30000" in out


def test_reuse_bench_counts_examples_and_tokens_per_variant():
    from gpo_exp.bench import reuse

    out = reuse.main(["--variants", "baseline,replace_all,tree:max_token_ratio=3.0", "--optimizers", "dpo,grpo",
                      "gpo.prompts_per_round=4", "trainer.eval_rows=4"])
    base, rep, tree = (out["variants"][k] for k in ("baseline", "replace_all", "tree:max_token_ratio=3.0"))
    assert base["tokens"]["total"] == base["tokens"]["trajectories"] > 0 and base["groups"]["reset"] == 0
    assert base["examples"]["dpo"]["capped"]["gpo/examples_reset"] == 0 and rep["groups"]["fresh"] == 0
    t = tree["tokens"]
    assert t["total"] == t["trajectories"] + t["estimation"] + t["reset"] and t["trajectories"] == base["tokens"]["total"]
    k = t["total"] / 1000
    n = sum(tree["examples"]["dpo"]["capped"].values())
    assert tree["examples_per_1k_tokens"]["dpo"]["capped"] == round(n / k, 2)
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        reuse.main(["--variants", "nope"])
    with pytest.raises(SystemExit, match="'mixx' is not a gpo field"):
        reuse.main(["--variants", "tree:mixx=augment"])
