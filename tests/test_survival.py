"""Runs that survive: sweep job directories, failure records, immutable finished runs, the report's
failed/missing jobs and its refusal to pool different configs (fast, no training here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from gpo_exp.training import rundir
from gpo_exp.config import job_subdir, register_configs
from gpo_exp.report import build_report, collect_jobs
from tests.conftest import CONF_DIR


@pytest.fixture(scope="module")
def job_dirs():
    """job_dirs(sweep overrides) -> {job overrides: (sweep subdir, run dir)} as Hydra resolves them per job."""
    register_configs()
    GlobalHydra.instance().clear()

    def dirs(line: list[str]) -> dict[tuple[str, ...], tuple[str, str]]:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(line), None)[0]
        out = {}
        for job in jobs:
            cfg = hydra_compose(config_name="config", overrides=list(job), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            out[tuple(job)] = (str(cfg.hydra.sweep.subdir), str(cfg.hydra.run.dir))
        return out

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield dirs
    GlobalHydra.instance().clear()


def test_swept_values_give_every_job_its_own_directory(job_dirs):
    dirs = job_dirs(["optimizer.beta=0.1,0.5", "estimator.k=0,2", "seed=0,1"])
    subdirs = {sub for sub, _ in dirs.values()}
    assert len(subdirs) == 8  # was 4: the two beta values shared one directory
    assert "gpo-dpo_mc-k2/arith/optimizer.beta=0.5/seed1" in subdirs  # arm, benchmark, other keys, seed last


def test_baseline_arms_carry_no_estimator_name_but_never_collide(job_dirs):
    dirs = job_dirs(["gpo.enabled=false,true", "optimizer=dpo,kto"])
    assert {sub for sub, _ in dirs.values()} == {"dpo/arith/seed0", "kto/arith/seed0", "gpo-dpo_mc-k4/arith/seed0",
                                                 "gpo-kto_mc-k4/arith/seed0"}
    # a baseline sweep over estimator settings stays apart (they are not in its name)
    base = job_dirs(["gpo.enabled=false", "estimator.k=2,4"])
    assert {sub for sub, _ in base.values()} == {"dpo/arith/estimator.k=2/seed0", "dpo/arith/estimator.k=4/seed0"}


def test_single_run_directory_names_the_estimator(job_dirs):
    (_, run), = job_dirs(["estimator=bisect"]).values()
    assert run.startswith("outputs/runs/") and run.endswith("_gpo-dpo_bisect-k4_arith_seed0")
    (_, run), = job_dirs(["gpo.enabled=false"]).values()
    assert run.endswith("_dpo_arith_seed0")


def test_job_subdir_keeps_every_override_that_is_not_in_the_name():
    sub = job_subdir("mine", "true", "dpo", "mc", 4, "arith", 3,
                     ["name=mine", "optimizer=kto", "+sweep=main", "hydra.verbose=true", "logger.wandb=false",
                      "data_files=/a/b.jsonl"])
    # a custom name does not spell the optimizer, so the optimizer stays; '/' never nests directories
    assert sub == "mine_mc-k4/arith/data_files=_a_b.jsonl,name=mine,optimizer=kto/seed3"


# --- the report ---------------------------------------------------------------------------------


def _job(root: Path, rel: str, overrides: list[str], summary: dict | None, config: dict | None = None) -> None:
    d = root / rel
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({**summary, "config": config}))


def _config(beta: float = 0.1, seed: int = 0, lr: float = 1e-5, enabled: bool = True) -> dict:
    return {"optimizer": {"name": "dpo", "beta": beta, "lr": lr}, "gpo": {"enabled": enabled},
            "estimator": {"name": "mc", "k": 4}, "benchmark": {"name": "arith"}, "seed": seed,
            "logger": {"wandb": seed == 0}, "trainer": {"progress_bar": seed == 1}}


def test_report_lists_failed_diverged_partial_and_never_started_jobs(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n    params: {}\n"
        "  overrides:\n    task:\n    - optimizer.lr=1e9,1e-5\n    - seed=0,1\n")
    ok = {"status": "ok", "eval/accuracy_before": 0.3, "eval/accuracy_after": 0.5}
    _job(tmp_path, "a", ["optimizer.lr=1e-5", "seed=0"], ok, _config(seed=0))
    _job(tmp_path, "b", ["optimizer.lr=1e9", "seed=0"],
         {"status": "diverged", "error": "Diverged: non-finite weights in policy.x after round 1",
          "diverged_round": 1}, _config(lr=1e9))
    _job(tmp_path, "c", ["optimizer.lr=1e9", "seed=1"], None)  # killed: no summary.json
    # optimizer.lr=1e-5 seed=1 never started: no directory at all
    runs, missing, failed = collect_jobs(tmp_path)
    assert [r.name for r in runs] == ["a"]
    assert failed == ["optimizer.lr=1e9 seed=0 (b) [diverged, round 1: Diverged: non-finite weights in policy.x after round 1]"]
    assert missing == ["optimizer.lr=1e9 seed=1 (c)", "optimizer.lr=1e-05 seed=1 [never started: no job directory]"]
    rep = build_report(tmp_path, out_dir=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Failed runs (1" in md and "Missing runs (2" in md and "never started" in md


def test_report_never_pools_configs_that_differ_beyond_the_seed(tmp_path):
    ok = {"status": "ok", "eval/accuracy_before": 0.3}
    for seed in (0, 1):  # seeds (and logging settings) pool; beta splits, and is named
        _job(tmp_path, f"b01/s{seed}", [], {**ok, "eval/accuracy_after": 0.5 + seed / 10}, _config(0.1, seed))
        _job(tmp_path, f"b05/s{seed}", [], {**ok, "eval/accuracy_after": 0.7}, _config(0.5, seed))
    rep = build_report(tmp_path, out_dir=tmp_path / "out")
    assert [(a.label, len(a.runs)) for a in rep.arms] == [("GPO-DPO (optimizer.beta=0.1)", 2),
                                                          ("GPO-DPO (optimizer.beta=0.5)", 2)]
    assert rep.row("GPO-DPO (optimizer.beta=0.1)", "arith").mean == pytest.approx(0.55)
    assert "71.8 ± 50.4" not in rep.table_markdown


# --- run directories ------------------------------------------------------------------------------


def test_failure_record_is_a_summary_with_status_and_one_line_error(tmp_path):
    assert rundir.record_failure(tmp_path / "job", "failed", rundir.one_line(ValueError("bad\nsecond line")),
                                 {"seed": 0}, "gpo-dpo")
    s = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert (s["status"], s["error"], s["config"]) == ("failed", "ValueError: bad", {"seed": 0})
    assert rundir.is_finished(tmp_path / "job")


def test_remove_if_empty_keeps_anything_with_content(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x").write_text("1")
    rundir.remove_if_empty(tmp_path / "a" / "b")
    rundir.remove_if_empty(tmp_path / "keep")
    assert not (tmp_path / "a").exists() and (tmp_path / "keep" / "x").exists()


def test_differing_keys_names_nested_keys():
    assert rundir.differing_keys({"a": {"b": 1, "c": 2}, "resume": None}, {"a": {"b": 1, "c": 3}, "resume": "x"},
                                 ignore=("resume",)) == ["a.c"]


# --- bad inputs: each stops with one line naming the value (validated before any heavy import) ----

BAD_CONFIGS = [
    ("trainer.rounds=0", "trainer.rounds=0"), ("trainer.devices=0", "trainer.devices=0"),
    ("trainer.strategy=magic", "trainer.strategy='magic'"), ("trainer.strategy=fsdp", "trainer.strategy='fsdp'"),
    ("trainer.strategy=deepspeed_stage_2", "gathering it for generation is not implemented"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints=-1"),
    ("trainer.accelerator=quantum", "trainer.accelerator='quantum'"), ("trainer.eval_rows=0", "trainer.eval_rows=0"),
    ("trainer.eval_samples=-1", "trainer.eval_samples=-1"), ("trainer.cpu_threads=0", "trainer.cpu_threads=0"),
    ("gpo.samples_per_prompt=0", "gpo.samples_per_prompt=0"), ("estimator.k=0", "estimator.k=0"),
    ("optimizer.beta=-1", "optimizer.beta=-1"), ("gpo.prompts_per_round=0", "gpo.prompts_per_round=0"),
    ("gpo.max_generated_tokens=0", "gpo.max_generated_tokens=0"), ("gpo.reference_k=-1", "gpo.reference_k=-1"),
    ("engine.temperature=-1", "engine.temperature=-1"), ("engine.top_p=0", "engine.top_p=0"),
    ("engine.batch_size=0", "engine.batch_size=0"), ("engine.backend=sglang", "engine.backend='sglang'"),
    ("logger.mode=sometimes", "logger.mode='sometimes'"), ("model.source=ftp", "model.source='ftp'"),
    ("+model.dtype=int3", "model.dtype='int3'"), ("model.lora_r=-2", "model.lora_r=-2"),
    ("model.lora_dropout=1.5", "model.lora_dropout=1.5"), ("model.source=hub", "model.path=None"),
]


@pytest.mark.parametrize("override,needle", BAD_CONFIGS, ids=[o for o, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_value(compose, override, needle):
    from gpo_exp.training.run_config import validate
    from gpo_exp.registry import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_two_devices_refuse_the_single_device_strategy(compose):
    from gpo_exp.training.run_config import validate
    from gpo_exp.registry import ConfigError

    with pytest.raises(ConfigError, match="when trainer.devices > 1"):
        validate(compose(["trainer.devices=2", "trainer.strategy=single_device"]))


# --- the end of a run: results first, then the weights ------------------------------------------


def test_a_failed_final_save_is_recorded_and_keeps_the_results(compose, tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from transformers import PreTrainedModel

    from gpo_exp.training.run_config import validate
    from gpo_exp.run import apply_fast_dev_run, train

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    summary = train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["checkpoint_error"] == "OSError: [Errno 28] No space left on device"
    assert on_disk["eval/accuracy_after"] == summary["eval/accuracy_after"] and on_disk["rounds"] == 1
    assert (tmp_path / "resume" / "round001.ckpt").exists()  # the weights survive in the resume checkpoint


# --- launchers ------------------------------------------------------------------------------------


def test_slurm_launcher_sizes_the_job_from_trainer_devices_and_requeues():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["+launcher=slurm", "trainer.devices=4"],
                            return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 1)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0 and list(launcher.setup) == []


def test_joblib_workers_claim_distinct_gpus(tmp_path, monkeypatch):
    import fcntl

    from gpo_exp.training import distributed

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(distributed, "_claimed", None)
    other = (tmp_path / "gpu0.lock").open("w")  # another worker holds GPU 0
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert distributed.claim_gpu(tmp_path, n_gpus=2) == 1
        assert distributed.os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert distributed.claim_gpu(tmp_path, n_gpus=2) == 1  # a reused worker keeps its GPU
    finally:
        monkeypatch.setattr(distributed, "_claimed", None)
        other.close()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert distributed.claim_gpu(tmp_path, n_gpus=0) is None  # no GPUs: nothing set
    assert "CUDA_VISIBLE_DEVICES" not in distributed.os.environ


def test_shards_cover_the_rows_once_and_batches_split_for_every_rank():
    from gpo_exp.training.datamodule import rank_slice
    from gpo_exp.training.distributed import shard

    for n in (0, 1, 7, 8):
        parts = [shard(n, r, 3) for r in range(3)]
        assert [i for s, e in parts for i in range(s, e)] == list(range(n))
    batch = list(range(5))
    assert [rank_slice(batch, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [rank_slice([9], r, 2) for r in range(2)] == [[9], [9]]  # never an empty rank (DDP would hang)


# --- more bad inputs: where to write, what to resume, what fits, what diverges ---------------------


def test_an_unwritable_output_directory_is_one_line_before_hydra(capsys):
    from gpo_exp.run import preflight

    with pytest.raises(SystemExit) as stop:
        preflight(["trainer.rounds=2", "hydra.run.dir=/proc/gpo_exp_cannot_write_here"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the output directory /proc/gpo_exp_cannot_write_here") and err.count("\n") == 1


def test_resume_of_a_directory_without_a_run_is_a_config_error(tmp_path):
    from gpo_exp.registry import ConfigError
    from gpo_exp.run import _resume_config

    with pytest.raises(ConfigError, match=r"bad config resume=.*no run there"):
        _resume_config(tmp_path)


def test_a_benchmark_longer_than_the_tiny_context_stops_with_the_fix():
    from gpo_exp.benchmarks import get
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.registry import ConfigError
    from gpo_exp.models.tiny_context import check_fits, tokens_needed

    arith = get("arith")
    assert tokens_needed(arith, arith.load("train")) <= 160  # the shipped warm start's max_len stays
    check_fits(ModelConfig(), arith, arith.load("test"))
    long_row = [{"prompt": "x" * 200, "answer": "1", "solution": "y"}]
    with pytest.raises(ConfigError, match=r"model.max_len=160: benchmark arith needs 268 tokens.*model.max_len=268"):
        check_fits(ModelConfig(), arith, long_row)
    check_fits(ModelConfig(source="hub", path="x"), arith, long_row)  # hub models have their own context


def test_a_diverging_run_ends_with_status_diverged_and_its_round(compose, tmp_path):
    from omegaconf import OmegaConf

    from gpo_exp.training.run_config import validate
    from gpo_exp.run import apply_fast_dev_run, train

    dcfg = compose(["trainer.fast_dev_run=true", "logger.wandb=false", "trainer.progress_bar=false", "optimizer.lr=1e9"])
    cfg = validate(dcfg)
    apply_fast_dev_run(cfg)
    summary = train(cfg, tmp_path, OmegaConf.to_container(dcfg, resolve=True))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert (on_disk["status"], on_disk["diverged_round"]) == ("diverged", 1) == (summary["status"], 1)
    assert "non-finite" in on_disk["error"] and on_disk["eval/accuracy_before"] > 0  # round 0 is kept
    assert not (tmp_path / "checkpoint").exists()  # no diverged weights saved as the run's result
