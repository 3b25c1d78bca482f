"""gpo_exp.report on a synthetic multirun directory with hand-computed numbers."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gpo_exp.report import build_report, main, summarize, t_quantile, welch_diff
from gpo_exp.report.plots import critical_step_fractions, estimator_values, round_curves

ROOT = Path(__file__).resolve().parents[1]
DPO = [0.50, 0.52, 0.54]
GPO_DPO = [0.55, 0.57, 0.59]
KTO = [0.40, 0.46]
GPO_KTO = [0.44, 0.50, 0.53]


def _write_run(root: Path, rel: str, *, opt: str, gpo: bool, seed: int, acc: float, est: str = "mc", k: int | None = 4,
               extra: dict | None = None, est_fields: dict | None = None) -> None:
    d = root / rel
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"optimizer={opt}", f"gpo.enabled={str(gpo).lower()}", f"seed={seed}"]
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = {"optimizer": {"name": opt}, "gpo": {"enabled": gpo}, "estimator": {"name": est, "k": k, **(est_fields or {})},
              "benchmark": {"name": "arith"}, "seed": seed}
    summary = {
        "eval/accuracy_before": 0.30, "eval/accuracy_after": acc,
        "eval/gsm/accuracy_before": 0.10, "eval/gsm/accuracy_after": acc - 0.2,
        "rollout/generated_tokens": 1000 * (seed + 1), "time/total_s": 10.0 * (seed + 1),
        "arm": ("GPO-" if gpo else "") + opt.upper(), "config": config,
    }
    if gpo:
        summary |= {"gpo/critical_step_hist": [1, 3, 0, 2, seed], "gpo/critical_agrees_first_error": 0.5,
                    "gpo/rollouts_per_trajectory": 12.0 + seed, "gpo/rollout_tokens_per_trajectory": 300.0 + 10 * seed}
    summary |= extra or {}
    (d / "summary.json").write_text(json.dumps(summary))
    rounds = [{"round": r, "eval/accuracy": 0.30 + r * (acc - 0.30) / 2, "rollout/generated_tokens": 500 * r}
              for r in range(3)]
    (d / "rounds.jsonl").write_text("\n".join(json.dumps(x) for x in rounds) + "\n{\"round\": 3, \"eval")  # torn


@pytest.fixture(scope="module")
def multirun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multirun")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for s, a in enumerate(DPO):
        _write_run(root, f"dpo/mc/arith/seed{s}", opt="dpo", gpo=False, seed=s, acc=a)
    for s, a in enumerate(GPO_DPO):
        _write_run(root, f"gpo-dpo/mc/arith/seed{s}", opt="dpo", gpo=True, seed=s, acc=a)
    _write_run(root, "gpo-dpo/bisect/arith/seed0", opt="dpo", gpo=True, seed=0, acc=0.60, est="bisect")
    for s, a in enumerate(KTO):
        _write_run(root, f"kto/{s}", opt="kto", gpo=False, seed=s, acc=a)
    for s, a in enumerate(GPO_KTO):
        _write_run(root, f"gpo-kto/{s}", opt="kto", gpo=True, seed=s, acc=a)
    failed = root / "kto" / "2" / ".hydra"  # crashed before writing summary.json
    failed.mkdir(parents=True)
    failed.joinpath("overrides.yaml").write_text("- optimizer=kto\n- gpo.enabled=false\n- seed=2\n")
    return root


@pytest.fixture(scope="module")
def report(multirun: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_report(multirun, out_dir=tmp_path_factory.mktemp("out"))


def test_t_quantile_matches_tables() -> None:
    for df, t in [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    assert t_quantile(0.975, 4.5) == pytest.approx(2.6589, abs=1e-4)  # non-integer df (Welch); scipy: 2.658912
    assert t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # -> normal


def test_summarize_and_welch_by_hand() -> None:
    st = summarize(DPO)
    assert st.mean == pytest.approx(0.52) and st.std == pytest.approx(0.02)
    assert st.ci95 == pytest.approx(4.303 * 0.02 / math.sqrt(3), abs=1e-5)
    assert summarize([0.7]).ci95 is None
    d = welch_diff(GPO_DPO, DPO)  # equal variances and n: Welch df = 2(n-1) = 4
    assert d.mean == pytest.approx(0.05)
    assert d.ci95 == pytest.approx(2.776 * math.sqrt(2 * 0.02**2 / 3), abs=1e-5)
    assert welch_diff([0.5, 0.5], [0.4, 0.4]).ci95 == 0.0


def test_arms_rows_and_order(report) -> None:
    labels = [a.label for a in report.arms]
    assert labels == ["DPO", "GPO-DPO (mc)", "GPO-DPO (bisect)", "KTO", "GPO-KTO"]
    first_col = [line.split("|")[1].strip() for line in report.table_markdown.splitlines()[2:]]
    assert first_col == ["DPO", "GPO-DPO (mc)", "Δ GPO-DPO (mc) vs DPO", "GPO-DPO (bisect)",
                         "Δ GPO-DPO (bisect) vs DPO", "KTO", "GPO-KTO", "Δ GPO-KTO vs KTO"]


def test_cells_means_cis_and_deltas(report) -> None:
    dpo, gpo = report.row("DPO", "arith"), report.row("GPO-DPO (mc)", "arith")
    assert (dpo.mean, dpo.n) == (pytest.approx(0.52), 3)
    assert dpo.ci95 == pytest.approx(4.303 * 0.02 / math.sqrt(3), abs=1e-5)
    assert gpo.mean == pytest.approx(0.57) and gpo.ci95 == pytest.approx(dpo.ci95)
    kto = report.row("KTO", "arith")  # 2 seeds: t(0.975, 1) = 12.706, s = 0.06/sqrt(2)
    assert kto.mean == pytest.approx(0.43)
    assert kto.ci95 == pytest.approx(12.706 * (0.06 / math.sqrt(2)) / math.sqrt(2), abs=1e-4)
    bisect = report.row("GPO-DPO (bisect)", "arith")
    assert (bisect.mean, bisect.ci95, bisect.n) == (pytest.approx(0.60), None, 1)

    delta = report.row("Δ GPO-DPO (mc) vs DPO", "arith")
    assert delta.kind == "delta" and delta.mean == pytest.approx(0.05) and delta.n == 6
    assert delta.ci95 == pytest.approx(2.776 * math.sqrt(2 * 0.02**2 / 3), abs=1e-5)
    assert report.row("Δ GPO-DPO (bisect) vs DPO", "arith").ci95 is None  # n = 1 side
    # Extra benchmark (eval/gsm/accuracy_after = acc - 0.2) and Avg = per-seed mean of arith and gsm.
    assert report.row("DPO", "gsm").mean == pytest.approx(0.32)
    avg = report.row("DPO", "Avg")
    assert avg.mean == pytest.approx(0.42) and avg.ci95 == pytest.approx(dpo.ci95)
    assert report.row("DPO", "Avg", "eval/accuracy_before").mean == pytest.approx(0.20)
    assert report.row("KTO", "", "rollout/generated_tokens").mean == pytest.approx(1500)


def test_markdown_cells(report) -> None:
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in report.table_markdown.splitlines()}
    assert lines["Method"] == ["arith (%)", "gsm (%)", "Avg (%)", "n", "before (%)", "gen. tokens", "time (s)"]
    assert lines["DPO"] == ["52.0 ± 5.0", "32.0 ± 5.0", "42.0 ± 5.0", "3", "20.0", "2,000", "20"]
    assert lines["Δ GPO-DPO (mc) vs DPO"][:3] == ["+5.0 ± 4.5", "+5.0 ± 4.5", "+5.0 ± 4.5"]
    assert lines["GPO-DPO (bisect)"][:2] == ["60.0", "40.0"]


def test_csv_matches_rows(report) -> None:
    csv_path = next(p for p in report.files if p.name == "report.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(report.rows)
    dpo = next(r for r in rows if (r["arm"], r["benchmark"], r["metric"]) == ("DPO", "arith", "eval/accuracy_after"))
    assert (dpo["kind"], float(dpo["mean"]), int(dpo["n"])) == ("arm", pytest.approx(0.52), 3)
    assert float(dpo["std"]) == pytest.approx(0.02)
    assert float(dpo["ci95"]) == pytest.approx(4.303 * 0.02 / math.sqrt(3), abs=1e-5)
    delta = next(r for r in rows if r["arm"] == "Δ GPO-KTO vs KTO" and r["benchmark"] == "arith")
    assert float(delta["mean"]) == pytest.approx(sum(GPO_KTO) / 3 - sum(KTO) / 2) and delta["std"] == ""


def test_missing_run_listed(report) -> None:
    assert report.missing == ["optimizer=kto gpo.enabled=false seed=2 (kto/2)"]
    md = next(p for p in report.files if p.name == "report.md").read_text()
    assert "- optimizer=kto gpo.enabled=false seed=2 (kto/2)" in md


def test_plots_written(report) -> None:
    names = {p.name for p in report.files}
    assert names == {"report.md", "report.csv", "accuracy_vs_round.png", "critical_steps.png", "rollout_cost.png",
                     "accuracy_vs_tokens.png"}
    for p in report.files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_data(report) -> None:
    arms = {a.label: a for a in report.arms}
    # [1, 3, 0, 2, seed] over seeds 0, 1, 2 -> counts [3, 9, 0, 6, 3] of 21
    assert critical_step_fractions(arms["GPO-DPO (mc)"]) == pytest.approx([3 / 21, 9 / 21, 0, 6 / 21, 3 / 21])
    assert critical_step_fractions(arms["DPO"]) == []
    costs = estimator_values(report.arms, "gpo/rollout_tokens_per_trajectory")
    assert costs == {"mc K=4": [300.0, 310.0, 320.0, 300.0, 310.0, 320.0], "bisect K=4": [300.0]}
    dpo = next(c for c in round_curves(report.arms, "eval/accuracy") if c.label == "DPO")
    assert dpo.rounds == [0, 1, 2]  # the torn 4th line is skipped
    assert dpo.mean == pytest.approx([0.30, 0.41, 0.52]) and dpo.tokens == [0.0, 500.0, 1000.0]
    assert dpo.ci95[1] == pytest.approx(4.303 * 0.01 / math.sqrt(3), abs=1e-5)


def test_k_variants_get_rows(tmp_path: Path) -> None:
    for s in range(2):
        _write_run(tmp_path, f"a{s}", opt="simpo", gpo=True, seed=s, acc=0.5, k=4)
        _write_run(tmp_path, f"b{s}", opt="simpo", gpo=True, seed=s, acc=0.6, k=8)
    rep = build_report(tmp_path, metric="eval/accuracy_after")
    assert [a.label for a in rep.arms] == ["GPO-SimPO (K=4)", "GPO-SimPO (K=8)"]
    assert rep.row("GPO-SimPO (K=8)", "arith").ci95 == 0.0


def test_k_labels_only_estimators_that_have_one(tmp_path: Path) -> None:
    """K is mc's and bisect's knob; random and confidence have none, adaptive's k is only its mc fallback."""
    for est, k in (("mc", 4), ("mc", 8), ("bisect", 4), ("adaptive", 4), ("confidence", None), ("random", None)):
        _write_run(tmp_path, f"{est}{k}", opt="dpo", gpo=True, seed=0, acc=0.5, est=est, k=k)
    rep = build_report(tmp_path, metric="eval/accuracy_after")
    assert sorted(a.label for a in rep.arms) == [
        "GPO-DPO (adaptive)", "GPO-DPO (bisect, K=4)", "GPO-DPO (confidence)", "GPO-DPO (mc, K=4)",
        "GPO-DPO (mc, K=8)", "GPO-DPO (random)"]


def test_other_estimator_fields_that_vary_split_arms(tmp_path: Path) -> None:
    """A sweep over estimator.temperature gives one row per temperature, not one pooled row."""
    for s in range(2):
        _write_run(tmp_path, f"a{s}", opt="dpo", gpo=True, seed=s, acc=0.5, est_fields={"temperature": None, "explore": "failed"})
        _write_run(tmp_path, f"b{s}", opt="dpo", gpo=True, seed=s, acc=0.7, est_fields={"temperature": 0.5, "explore": "failed"})
    rep = build_report(tmp_path, metric="eval/accuracy_after")
    assert [a.label for a in rep.arms] == ["GPO-DPO (temperature=0.5)", "GPO-DPO (temperature=null)"]
    assert rep.row("GPO-DPO (temperature=0.5)", "arith").mean == pytest.approx(0.7)


def test_bad_metric_names_available(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path, "0", opt="dpo", gpo=False, seed=0, acc=0.5)
    assert main([str(tmp_path), "--metric", "eval/nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("metric 'eval/nope' is in no summary.json; available: eval/accuracy_after, ")


def test_main_prints_table(multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(multirun), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| DPO | 52.0 ± 5.0 |" in out and "optimizer=kto gpo.enabled=false seed=2 (kto/2)" in out


def test_empty_dir_one_line_exit_1(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gpo_exp.report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr == f"no runs found under {tmp_path} (looked for summary.json)\n"


def test_wandb_without_network_fails_in_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main(["--wandb-project", "nobody/nothing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("could not read wandb project 'nobody/nothing': ") and err.count("\n") == 1


def test_labels_skip_keys_only_some_arms_have(tmp_path: Path) -> None:
    """mc next to adaptive: adaptive's own fields are implied by its name, not spelled out as `grow=null`."""
    _write_run(tmp_path, "mc", opt="dpo", gpo=True, seed=0, acc=0.5, est="mc", k=4)
    _write_run(tmp_path, "ad", opt="dpo", gpo=True, seed=0, acc=0.6, est="adaptive", k=4,
               est_fields={"grow": False, "batch": 2, "prior": "confidence"})
    _write_run(tmp_path, "ad_grow", opt="dpo", gpo=True, seed=0, acc=0.7, est="adaptive", k=4,
               est_fields={"grow": True, "batch": 2, "prior": "confidence"})
    rep = build_report(tmp_path, metric="eval/accuracy_after")
    assert sorted(a.label for a in rep.arms) == ["GPO-DPO (adaptive, grow=False)", "GPO-DPO (adaptive, grow=True)",
                                                 "GPO-DPO (mc)"]


def test_labels_stay_distinct_when_only_a_missing_key_differs(tmp_path: Path) -> None:
    _write_run(tmp_path, "old", opt="dpo", gpo=False, seed=0, acc=0.5)
    _write_run(tmp_path, "new", opt="dpo", gpo=False, seed=0, acc=0.6, extra={})
    cfg_new = json.loads((tmp_path / "new" / "summary.json").read_text())
    cfg_new["config"]["gpo"]["mix"] = 0.5
    (tmp_path / "new" / "summary.json").write_text(json.dumps(cfg_new))
    rep = build_report(tmp_path, metric="eval/accuracy_after")
    assert sorted(a.label for a in rep.arms) == ["DPO (gpo.mix=0.5)", "DPO (gpo.mix=unset)"]


def test_one_visual_grammar(report) -> None:
    """Colour = optimizer, line style and marker = GPO or baseline, the same in every figure."""
    from gpo_exp.report.style import BASE_LINE, BASE_MARKER, GPO_LINE, GPO_MARKER, styles

    import colorsys

    st = styles(report.arms)
    hue = lambda label: round(colorsys.rgb_to_hsv(*st[label].color)[0], 3)  # noqa: E731
    assert hue("DPO") == hue("GPO-DPO (mc)") == hue("GPO-DPO (bisect)") != hue("KTO") == hue("GPO-KTO")
    assert (st["DPO"].linestyle, st["DPO"].marker) == (BASE_LINE, BASE_MARKER) == ("--", "s")
    assert (st["GPO-DPO (mc)"].linestyle, st["GPO-DPO (mc)"].marker) == (GPO_LINE, GPO_MARKER) == ("-", "o")
    assert st["GPO-DPO (mc)"].color != st["GPO-DPO (bisect)"].color  # two GPO-DPO arms: two shades of DPO's colour
    widths = [st[a.label].linewidth for a in report.arms]  # coinciding arms stay visible: earlier ones drawn wider
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)
    assert len({st[a.label].dodge for a in report.arms}) == len(report.arms)


def test_figures_draw_without_layout_warnings(report, tmp_path: Path) -> None:
    import warnings

    from gpo_exp.report.plots import plot_all

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = plot_all(report.arms, tmp_path, "eval/accuracy_after")
    assert [p.name for p in written] == ["accuracy_vs_round.png", "critical_steps.png", "rollout_cost.png"]
    assert [str(w.message) for w in caught] == []


def test_equal_token_curves_step_at_evaluations_only() -> None:
    """The mean step curve has a point where a run evaluated and at the common end, nowhere else."""
    from gpo_exp.report.compare import arm_token_curve
    from gpo_exp.report.types import Arm, Run

    runs = [Run("a", {}, {}), Run("b", {}, {})]
    curves = {id(runs[0]): [(0, 0.0, 0.2), (1, 100.0, 0.4), (2, 250.0, 0.6)],
              id(runs[1]): [(0, 0.0, 0.2), (1, 150.0, 0.5), (2, 200.0, 0.7)]}
    grid, mean, _ = arm_token_curve(Arm("X", "dpo", False, runs), curves)
    assert grid == [0.0, 100.0, 150.0, 200.0]
    assert mean == pytest.approx([0.2, 0.3, 0.45, 0.55])
