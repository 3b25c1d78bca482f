"""`python -m gpo_exp.eval`: config and its errors, exact metrics with a scripted engine, eval.json, wandb keys."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gpo_exp.benchmarks import BENCHMARKS
from gpo_exp.eval import evaluate_model, main, validate
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.tiny import char_tokenizer, tiny_model
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.engine import Generation, HFRolloutEngine
from tests.conftest import CONF_DIR

ARITH_S1 = ["+benchmark@bench.arith_s1=arith", "bench.arith_s1.seed=1", "benchmarks=[arith,arith_s1]"]
QUICK = ["max_rows=5", "samples=2", "logger.wandb=false"]


def arith_rows(seed: int = 0) -> list[dict]:
    """Test rows of arith as conf/benchmark/arith.yaml configures it (what the evaluation loads)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "benchmark" / "arith.yaml"))
    return BENCHMARKS.build({**cfg, "seed": seed}).load("test")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer GPT-2 with a char tokenizer over arith texts, saved like a run's checkpoint/."""
    rows = arith_rows(0) + arith_rows(1)
    tok = char_tokenizer([r["prompt"] + "\n" + r["solution"] for r in rows])
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(n_layer=1, n_embd=32, n_head=4), tok)
    out = tmp_path_factory.mktemp("run") / "checkpoint"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def compose():
    """compose(overrides) -> DictConfig of conf/eval.yaml, like the command line would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="eval", overrides=overrides)

    yield _compose
    GlobalHydra.instance().clear()


def scripted_generate(tok, rows, greedy_right, sample_right):
    """An engine.generate that answers from the gold solution: right or 'Answer: -1' as the two predicates say."""
    index = {r["prompt"] + "\n": i for i, r in enumerate(rows)}

    def generate(self, prefixes, sample_ids, *, seed, greedy=False, max_new_tokens=None):
        out = []
        for p, j in zip(prefixes, sample_ids):
            i = index[tok.decode(p, skip_special_tokens=True)]
            right = greedy_right(i) if greedy else sample_right(j)
            text = rows[i]["solution"] if right else "Answer: -1"
            out.append(Generation(ids=tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id],
                                  finished=True))
        return out

    return generate


def test_defaults_compose_to_tiny_on_arith(compose):
    cfg = validate(compose([]))
    assert (cfg.model.source, cfg.benchmarks, cfg.split, cfg.samples, cfg.seed, cfg.max_rows) == \
        ("tiny", ["arith"], "test", 4, 12345, None)
    assert cfg.logger.wandb and cfg.logger.mode == "offline"
    assert list(cfg.bench) == ["arith"] and cfg.bench["arith"].max_new_tokens == 64


def test_checkpoint_shortcut_and_benchmark_variants(compose, checkpoint):
    cfg = validate(compose([f"checkpoint={checkpoint}", *ARITH_S1, "bench.arith.mul_max=5"]))
    assert (cfg.model.source, cfg.model.path, cfg.model.name) == ("hub", str(checkpoint), checkpoint.parent.name)
    assert [(b.name, b.seed, b.mul_max) for b in cfg.bench.values()] == [("arith", 0, 5), ("arith", 1, 6)]


@pytest.mark.parametrize("override,needle", [
    ("benchmarks=[arith,nope]", "unknown benchmark 'nope'; available: aime24, aime25, arith, bbh, date, gsm8k, "
                                "gsm_symbolic, math, math500"),
    ("samples=-1", "samples=-1"),
    ("split=", "split=''"),
    ("max_rows=0", "max_rows=0"),
    ("benchmarks=[]", "benchmarks=[]"),
    ("bench.arith.n_ops=[5,1]", "benchmark.n_ops=[5, 1]"),
    ("checkpoint=/no/such/run/checkpoint", "checkpoint='/no/such/run/checkpoint': must be an existing HF directory"),
])
def test_bad_input_fails_with_one_line(compose, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_random_checkpoint_on_two_benchmarks_writes_eval_json(compose, checkpoint, tmp_path):
    result = evaluate_model(compose([f"checkpoint={checkpoint}", *ARITH_S1, *QUICK, f"output_dir={tmp_path}"]))
    metrics = {"accuracy", "sampled_accuracy", "pass@2", "maj@2", "truncated"}
    assert set(result) == {"model", "split", "samples", "seed", "protocol", "headline", "benchmarks", "avg", "seconds",
                           "names", "ci95"}
    assert (result["protocol"], result["headline"]) == ("greedy", "accuracy")
    assert list(result["benchmarks"]) == ["arith", "arith_s1"]
    for m in result["benchmarks"].values():
        assert set(m) == metrics | {"n"} and m["n"] == 5
        assert all(0.0 <= m[k] <= 1.0 for k in metrics) and m["sampled_accuracy"] <= m["pass@2"]
    assert set(result["avg"]) == metrics
    a, b = result["benchmarks"]["arith"], result["benchmarks"]["arith_s1"]
    assert result["avg"] == {k: pytest.approx((a[k] + b[k]) / 2) for k in metrics}
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["benchmarks"] == result["benchmarks"] and saved["avg"] == result["avg"]
    assert saved["config"]["model"]["path"] == str(checkpoint) and saved["config"]["bench"]["arith_s1"]["seed"] == 1


def test_scripted_engine_gives_exact_metrics(compose, checkpoint, tmp_path, monkeypatch):
    """Greedy right on rows 0, 2, 4; samples 0 and 1 right, sample 2 wrong: 3/5, 2/3, pass 1, maj 1."""
    from transformers import AutoTokenizer

    tok, rows = AutoTokenizer.from_pretrained(checkpoint), arith_rows()[:5]
    monkeypatch.setattr(HFRolloutEngine, "generate", scripted_generate(tok, rows, lambda i: i % 2 == 0,
                                                                       lambda j: j < 2))
    result = evaluate_model(compose([f"checkpoint={checkpoint}", "benchmarks=[arith]", "max_rows=5", "samples=3",
                                     "logger.wandb=false"]))
    assert result["benchmarks"]["arith"] == {"accuracy": 0.6, "sampled_accuracy": pytest.approx(2 / 3),
                                             "pass@3": 1.0, "maj@3": 1.0, "truncated": 0.0, "n": 5}

    monkeypatch.setattr(HFRolloutEngine, "generate", scripted_generate(tok, rows, lambda i: True, lambda j: True))
    assert evaluate_model(compose([f"checkpoint={checkpoint}", "benchmarks=[arith]", *QUICK]))["avg"] == \
        {"accuracy": 1.0, "sampled_accuracy": 1.0, "pass@2": 1.0, "maj@2": 1.0, "truncated": 0.0}
    monkeypatch.setattr(HFRolloutEngine, "generate", scripted_generate(tok, rows, lambda i: False, lambda j: False))
    assert evaluate_model(compose([f"checkpoint={checkpoint}", "benchmarks=[arith]", *QUICK]))["avg"] == \
        {"accuracy": 0.0, "sampled_accuracy": 0.0, "pass@2": 0.0, "maj@2": 0.0, "truncated": 0.0}


def test_greedy_only_reports_accuracy_and_logs_wandb_keys(compose, checkpoint, monkeypatch):
    logged: dict[str, float] = {}

    class FakeRun:
        summary = logged

        def log(self, d):
            logged.update(d)

        def finish(self):
            logged["finished"] = 1.0

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun() if kw["mode"] == "offline" else None)
    result = evaluate_model(compose([f"checkpoint={checkpoint}", *ARITH_S1, "max_rows=3", "samples=0"]))
    assert result["benchmarks"]["arith"].keys() == {"accuracy", "truncated", "n"}
    assert result["avg"].keys() == {"accuracy", "truncated"}
    assert set(logged) == {"eval/arith/accuracy", "eval/arith/truncated", "eval/arith/n", "eval/arith_s1/accuracy",
                           "eval/arith_s1/truncated", "eval/arith_s1/n", "eval/avg/accuracy", "eval/avg/truncated",
                           "finished"}
    assert logged["eval/avg/accuracy"] == result["avg"]["accuracy"] and logged["eval/arith/n"] == 3


def test_command_line_prints_table_and_exits_2_on_bad_input(checkpoint, tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    run_dir = tmp_path / "eval_run"
    monkeypatch.setattr(sys, "argv", ["gpo_exp.eval", f"checkpoint={checkpoint}", "benchmarks=[arith]", "max_rows=2",
                                      "samples=2",
                                      "logger.wandb=false", f"hydra.run.dir={run_dir}"])
    GlobalHydra.instance().clear()
    main()
    out = capsys.readouterr().out
    saved = json.loads((run_dir / "eval.json").read_text())
    assert "| benchmark | n | accuracy | sampled_accuracy | pass@2 | maj@2 | truncated | seconds |" in out
    assert f"| arith | 2 | {saved['benchmarks']['arith']['accuracy']:.3f} |" in out
    assert saved["benchmarks"]["arith"]["n"] == 2

    monkeypatch.setattr(sys, "argv", ["gpo_exp.eval", "benchmarks=[nope]", f"hydra.run.dir={tmp_path / 'bad'}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown benchmark 'nope'; available:") and "\n" not in err


def test_tiny_without_warm_start_is_a_random_tiny_model(compose):
    result = evaluate_model(compose(["model.n_layer=1", "model.n_embd=32", "warm_start.enabled=false", "max_rows=3",
                                     "samples=0", "logger.wandb=false"]))
    assert result["model"] == "tiny (warm start on arith: none)"
    assert result["benchmarks"]["arith"]["n"] == 3 and 0.0 <= result["avg"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_smollm2_greedy_on_gsm_symbolic_and_arith(compose, tmp_path):
    result = evaluate_model(compose(["model=smollm2_135m", "benchmarks=[gsm_symbolic,arith]", "max_rows=20",
                                     "samples=0", "logger.wandb=false", f"output_dir={tmp_path}"]))
    print(json.dumps(result, indent=2))
    for m in result["benchmarks"].values():
        assert m.keys() == {"accuracy", "n"} and m["n"] == 20 and 0.0 <= m["accuracy"] <= 1.0
    assert result["avg"]["accuracy"] == pytest.approx(
        (result["benchmarks"]["gsm_symbolic"]["accuracy"] + result["benchmarks"]["arith"]["accuracy"]) / 2)



# --- a run's own checkpoint: eval reproduces the run by default ----------------------------------------
RUN_ARGS = ["trainer.rounds=1", "gpo.prompts_per_round=3", "gpo.examples_per_round=6", "trainer.eval_rows=40",
            "trainer.eval_samples=2", "estimator.k=2", "logger.wandb=false", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-round testbed run (tiny model, 40 eval rows, greedy + 2 samples), finished with its checkpoint/."""
    import subprocess

    from tests.test_resume import ENV, ROOT

    d = tmp_path_factory.mktemp("evalrun") / "run"
    proc = subprocess.run([sys.executable, "-m", "gpo_exp.run", *RUN_ARGS, f"hydra.run.dir={d}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_a_runs_checkpoint_alone_reproduces_its_eval_exactly(compose, finished_run, tmp_path):
    """No benchmark list: the run's benchmark config (the testbed, not the clean arith), its 40 rows, its
    protocol and samples; every metric equals summary.json's eval/*_after, not just approximately."""
    summary = json.loads((finished_run / "summary.json").read_text())
    cfg = validate(compose([f"checkpoint={finished_run / 'checkpoint'}"]))
    assert (cfg.benchmarks, cfg.samples, cfg.protocol, cfg.precision, cfg.cpu_threads) == (["run"], 2, "greedy",
                                                                                            "32-true", 1)
    assert cfg.bench["run"].trap_p == summary["config"]["benchmark"]["trap_p"] == 0.5  # the testbed's trap
    result = evaluate_model(compose([f"checkpoint={finished_run}", "logger.wandb=false"]))  # the run dir works too
    mine = result["benchmarks"]["run"]
    assert mine["n"] == 40 and result["names"] == {"run": "arith"}
    for key in ("accuracy", "sampled_accuracy", "pass@2", "maj@2", "truncated"):
        assert mine[key] == summary[f"eval/{key}_after"], key
    assert result["run"]["reported"]["eval/accuracy_after"] == mine["accuracy"]
    from gpo_exp.eval import run_comparison

    assert run_comparison(result).count(": equal") == 5


def test_failed_benchmarks_are_one_line_each_and_exit_1(finished_run, tmp_path, monkeypatch, capsys):
    """gsm_symbolic's prompts do not fit the tiny checkpoint's 160 positions: its line says so; the run's
    benchmark still runs and is written; the command exits 1."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setattr(sys, "argv", ["gpo_exp.eval", f"checkpoint={finished_run / 'checkpoint'}", "max_rows=4",
                                      "benchmarks=[run,gsm_symbolic,nope_missing_file]",
                                      "+bench.nope_missing_file={name:gsm8k,data_files:/no/such.jsonl}",
                                      "logger.wandb=false", f"hydra.run.dir={tmp_path / 'e'}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err[0].startswith("error: gsm_symbolic: needs ") and "but the model's context is 160" in err[0]
    assert err[1] == "error: nope_missing_file: bad config benchmark.data_files: no such file '/no/such.jsonl'"
    assert err[2] == "error: 2 of 3 benchmarks failed: gsm_symbolic, nope_missing_file"
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert saved["benchmarks"]["run"]["n"] == 4 and set(saved["failed"]) == {"gsm_symbolic", "nope_missing_file"}


def test_a_checkpoint_without_its_run_directory_asks_for_benchmarks(compose, finished_run, tmp_path):
    import shutil

    orphan = tmp_path / "copied" / "checkpoint"
    shutil.copytree(finished_run / "checkpoint", orphan)
    with pytest.raises(ConfigError) as err:
        validate(compose([f"checkpoint={orphan}"]))
    assert "\n" not in str(err.value) and "no run directory beside it" in str(err.value)
    assert "benchmarks=[...]" in str(err.value)
    cfg = validate(compose([f"checkpoint={orphan}", "benchmarks=[arith_testbed]"]))  # named: it runs, from the YAML
    from gpo_exp.eval import bench_source

    assert bench_source(cfg, "arith_testbed") == "conf/benchmark/arith_testbed.yaml" and cfg.samples == 4
    with pytest.raises(ConfigError, match=r"'run' needs checkpoint=<run dir>/checkpoint"):
        validate(compose([f"checkpoint={orphan}", "benchmarks=[run]"]))


def test_a_run_config_this_code_no_longer_accepts_is_one_line(compose, finished_run, tmp_path):
    import shutil

    import yaml

    old = tmp_path / "old_run"
    shutil.copytree(finished_run, old)
    saved = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    saved["trainer"]["renamed_field"] = 1
    (old / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError) as err:
        validate(compose([f"checkpoint={old / 'checkpoint'}"]))
    msg = str(err.value)
    assert "\n" not in msg and "does not validate with this code" in msg and "renamed_field" in msg


# --- the paper's Table 1 ------------------------------------------------------------------------------
def test_paper_table_has_one_column_per_benchmark_with_its_ci_and_the_average():
    """Cells: mean ± 95% half-width in %, named as in the paper; the average's half-width is
    sqrt(sum of squares) / count (independent benchmarks)."""
    from gpo_exp.eval import half_width, paper_table

    per_row = {"b": [1.0, 0.0, 1.0, 1.0], "m": [0.5, 0.5]}
    result = {"model": "m1", "headline": "sampled_accuracy", "names": {"b": "bbh", "m": "math500"},
              "benchmarks": {k: {"sampled_accuracy": sum(v) / len(v), "n": len(v)} for k, v in per_row.items()},
              "ci95": {k: {"sampled_accuracy": half_width(v)} for k, v in per_row.items()}}
    hw_b = 3.182446305284263 * 0.5 / 2  # t(0.975, 3) * s / sqrt(4), s = 0.5
    assert result["ci95"]["b"]["sampled_accuracy"] == pytest.approx(hw_b)
    assert result["ci95"]["m"]["sampled_accuracy"] == 0.0
    md, csv_text = paper_table(result)
    lines = md.splitlines()
    assert lines[0] == "sampled_accuracy (%), 95% CI over problems; n = BBH 4, MATH 2"
    assert lines[2] == "| model | BBH | MATH | Avg |"
    assert lines[4] == f"| m1 | 75.0 ± {100 * hw_b:.1f} | 50.0 ± 0.0 | 62.5 ± {100 * hw_b / 2:.1f} |"
    assert csv_text.splitlines() == ["model,metric,BBH,BBH ci95,MATH,MATH ci95,Avg,Avg ci95",
                                     f"m1,sampled_accuracy,75.00,{100 * hw_b:.2f},50.00,0.00,62.50,{100 * hw_b / 2:.2f}"]


@pytest.mark.slow
def test_table1_preset_on_the_local_fixtures_with_a_random_model(tmp_path):
    """preset=table1_local: all seven benchmarks from tests/fixtures, the reasoning protocol, one table."""
    import csv
    import subprocess

    from tests.test_resume import ENV, ROOT

    proc = subprocess.run([sys.executable, "-m", "gpo_exp.eval", "preset=table1_local", "model=r1_distill_qwen_1p5b",
                           "model.source=random", "model.n_layer=1", "model.n_embd=64", "engine.max_new_tokens=4",
                           "samples=1", "logger.wandb=false", f"output_dir={tmp_path}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["protocol"] == "sampled" and saved["config"]["engine"]["temperature"] == 0.6
    assert {k: v["n"] for k, v in saved["benchmarks"].items()} == {
        "bbh": 6, "math500": 6, "gsm8k": 6, "mmlu": 6, "mmlu_pro": 6, "aime24": 3, "aime25": 3}
    assert set(saved["breakdown"]) >= {"bbh", "mmlu", "mmlu_pro"}
    rows = list(csv.reader((tmp_path / "table.csv").read_text().splitlines()))
    assert rows[0][2::2] == ["BBH", "MATH", "GSM8K", "MMLU", "MMLU-Pro", "AIME24", "AIME25", "Avg"]
    assert "| model | BBH | MATH | GSM8K | MMLU | MMLU-Pro | AIME24 | AIME25 | Avg |" in (tmp_path / "table.md").read_text()


def test_precision_follows_lightnings_names():
    """bf16-mixed / 16-mixed autocast the forward passes (as the run's trainer.precision did); 32 does not."""
    from gpo_exp.eval import precision_context

    a = torch.ones(2, 2)
    with precision_context("bf16-mixed", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with precision_context("32-true", "cpu"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"precision='bf16'"):
        validate({"precision": "bf16", "logger": {"wandb": False}})
