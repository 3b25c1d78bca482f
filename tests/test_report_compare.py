"""Comparisons at equal rounds and equal generated tokens, paired over seeds and over test rows."""
from __future__ import annotations

import math

import pytest

from gpo_exp.report import Run, group_arms, report_from_runs, t_quantile
from gpo_exp.report.compare import auc_tokens, compare, paired_diff, value_at_tokens

PTS = [(0, 0.0, 0.2), (1, 100.0, 0.4), (2, 300.0, 0.6)]


def test_step_curve_value_and_auc_at_a_budget():
    assert value_at_tokens(PTS, 0) == 0.2 and value_at_tokens(PTS, 99) == 0.2 and value_at_tokens(PTS, 250) == 0.4
    assert value_at_tokens(PTS, 1e9) == 0.6
    assert auc_tokens(PTS, 200) == pytest.approx((0.2 * 100 + 0.4 * 100) / 200)
    assert auc_tokens(PTS, 400) == pytest.approx((0.2 * 100 + 0.4 * 200 + 0.6 * 100) / 400)
    assert auc_tokens([(1, 5.0, 0.3)], 10) is None  # a curve must start at 0 tokens


def test_paired_diff_ci():
    st = paired_diff([0.5, 0.7, 0.6], [0.4, 0.5, 0.5])
    d = [0.1, 0.2, 0.1]
    sd = math.sqrt(sum((x - 0.4 / 3) ** 2 for x in d) / 2)
    assert st.mean == pytest.approx(0.4 / 3) and st.ci95 == pytest.approx(t_quantile(0.975, 2) * sd / math.sqrt(3))


def _run(opt, gpo, seed, pts, correct=None, legacy=False):
    """A run; per-row correctness as read from rounds/roundNNN_eval.jsonl (legacy: inside the round records)."""
    rounds = [{"round": r, "rollout/generated_tokens": t, "eval/accuracy": v,
               **({"eval/diag/greedy_correct": correct[r]} if correct and legacy else {})} for r, t, v in pts]
    return Run(f"{opt}{gpo}{seed}", {"eval/accuracy_after": pts[-1][2]},
               {"optimizer": {"name": opt}, "gpo": {"enabled": gpo}, "seed": seed, "estimator": {"name": "mc", "k": 4}},
               rounds, {} if legacy else dict(correct or {}))


def test_compare_equal_rounds_and_equal_tokens(tmp_path):
    # the baseline is cheap (100 tokens/round), GPO expensive (300/round): T = 600 = GPO's final spend
    runs = [_run("dpo", False, s, [(r, 100.0 * r, 0.2 + 0.05 * r + 0.01 * s) for r in range(7)],
                 {r: "1100" if r >= 3 else "1000" for r in range(7)}) for s in (0, 1)]
    runs += [_run("dpo", True, s, [(r, 300.0 * r, 0.2 + 0.1 * r + 0.01 * s) for r in range(3)],
                  {0: "1000", 1: "1000", 2: "1110"}) for s in (0, 1)]
    cmp = compare(group_arms(runs), tmp_path)
    assert cmp.budget == 600 and cmp.rounds == 2
    got = {(r.kind, r.arm, r.metric): r for r in cmp.rows}
    assert got[("compare", "DPO", "eq_rounds:eval/accuracy")].mean == pytest.approx(0.305)  # round 2
    assert got[("compare", "DPO", "eq_tokens:eval/accuracy")].mean == pytest.approx(0.505)  # round 6 at 600 tokens
    assert got[("compare", "GPO-DPO", "eq_tokens:eval/accuracy")].mean == pytest.approx(0.405)
    delta = "Δ GPO-DPO vs DPO"
    assert got[("compare_delta", delta, "eq_rounds:eval/accuracy")].mean == pytest.approx(0.1)
    assert got[("compare_delta", delta, "eq_rounds:eval/accuracy")].ci95 == pytest.approx(0.0)  # paired, constant
    assert got[("compare_delta", delta, "eq_tokens:eval/accuracy")].mean == pytest.approx(-0.1)
    # AUC over [0, 600]: DPO steps every 100 tokens, GPO every 300
    dpo0 = sum(0.2 + 0.05 * r for r in range(6)) / 6
    gpo0 = (0.2 + 0.3) / 2
    assert got[("compare_delta", delta, "auc_tokens:eval/accuracy")].mean == pytest.approx(gpo0 - dpo0)
    # by row at equal rounds: GPO 1110 vs DPO 1000 -> +0.5 mean over 4 rows; at equal tokens 1110 vs 1100
    rows_r = got[("compare_rows", delta, "eq_rounds:eval/accuracy")]
    assert rows_r.mean == pytest.approx(0.5) and rows_r.n == 4
    assert got[("compare_rows", delta, "eq_tokens:eval/accuracy")].mean == pytest.approx(0.25)
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert "T = 600" in cmp.markdown and "| Δ GPO-DPO vs DPO | | +10.0 ± 0.0 | -10.0 ± 0.0 |" in cmp.markdown
    # by round: mean over seeds of accuracy and cumulative tokens (DPO round 2: 0.3 + 0.005 over seeds 0 and 1)
    assert "| DPO | 20.5 (0k) | 25.5 (0k) | 30.5 (0k) | 35.5 (0k) |" in cmp.markdown
    assert "| GPO-DPO | 20.5 (0k) | 30.5 (0k) | 40.5 (1k) |  |  |  |  |" in cmp.markdown


def test_compare_at_equal_training_examples(tmp_path):
    # DPO trains on 10 pairs a round, GPO-DPO on 30 (fresh plus reset groups): E = 60 = GPO's final count
    def with_examples(run, per_round):
        for rec in run.rounds:
            rec["train/examples"] = per_round * rec["round"]
        return run

    runs = [with_examples(_run("dpo", False, s, [(r, 100.0 * r, 0.2 + 0.05 * r) for r in range(7)],
                               {r: "1100" if r >= 5 else "1000" for r in range(7)}), 10) for s in (0, 1)]
    runs += [with_examples(_run("dpo", True, s, [(r, 200.0 * r, 0.2 + 0.1 * r + 0.01 * s) for r in range(3)],
                                {0: "1000", 1: "1000", 2: "1110"}), 30) for s in (0, 1)]
    cmp = compare(group_arms(runs), tmp_path)
    got = {(r.kind, r.arm, r.metric): r for r in cmp.rows}
    assert got[("compare", "DPO", "eq_examples:eval/accuracy")].mean == pytest.approx(0.5)  # round 6: 60 pairs
    assert got[("compare", "GPO-DPO", "eq_examples:eval/accuracy")].mean == pytest.approx(0.405)  # round 2
    delta = "Δ GPO-DPO vs DPO"
    assert got[("compare_delta", delta, "eq_examples:eval/accuracy")].mean == pytest.approx(-0.095)
    assert got[("compare_rows", delta, "eq_examples:eval/accuracy")].mean == pytest.approx(0.25)  # 1110 vs 1100
    assert "equal training examples (E: DPO 60)" in cmp.markdown
    # a run without the counter (older runs): no examples column values, the rest unchanged
    runs[0].rounds[1].pop("train/examples")
    cmp = compare(group_arms(runs), tmp_path)
    assert "(E: " not in cmp.markdown and not any(r.metric.startswith("eq_examples") for r in cmp.rows)
    assert any(r.metric.startswith("eq_tokens") for r in cmp.rows)


def test_report_includes_the_comparison(tmp_path):
    runs = [_run("grpo", g, s, [(r, 100.0 * r * (1 + g), 0.3 + 0.02 * r * s) for r in range(3)]) for g in (False, True)
            for s in (0, 1)]
    rep = report_from_runs(runs, [], tmp_path)
    assert "Equal rounds (R = 2)" in rep.comparison and "Equal rounds" not in rep.table_markdown and any(r.kind == "compare_delta" for r in rep.rows)
    assert tmp_path / "accuracy_vs_tokens.png" in rep.files and "Equal rounds (R = 2)" in (tmp_path / "report.md").read_text()
    assert "compare_rows" not in (tmp_path / "report.csv").read_text()  # no per-row data logged
    assert "compare_delta" in (tmp_path / "report.csv").read_text()


def test_row_correctness_is_read_from_the_round_eval_files(tmp_path):
    """Per-row 0/1s live in rounds/roundNNN_eval.jsonl (not in summary.json); older runs kept them in rounds.jsonl."""
    import json

    from gpo_exp.report import collect_jobs
    from gpo_exp.report.compare import row_correctness

    d = tmp_path / "run"
    (d / "rounds").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"eval/accuracy_after": 0.5, "config": {"seed": 0}}))
    (d / "rounds.jsonl").write_text("".join(json.dumps({"round": r, "eval/accuracy": 0.5}) + "\n" for r in (0, 1)))
    for r, bits in ((0, "0110"), (1, "1110")):
        (d / "rounds" / f"round{r:03d}_eval.jsonl").write_text(
            "".join(json.dumps({"row": i, "greedy_correct": int(b)}) + "\n" for i, b in enumerate(bits)))
    (run,), _, _ = collect_jobs(tmp_path)
    assert run.row_correct == {0: "0110", 1: "1110"}
    assert row_correctness([run], lambda r: r.rounds[-1]) == [1.0, 1.0, 1.0, 0.0]
    legacy = _run("dpo", False, 0, [(0, 0.0, 0.5), (1, 10.0, 0.5)], {0: "01", 1: "11"}, legacy=True)
    assert row_correctness([legacy], lambda r: r.rounds[-1]) == [1.0, 1.0]
