"""`python -m gpo_exp.run [overrides]`: warm start, GPO rounds, evaluation, summary.json.

    compose + validate config (before torch is imported) -> refuse a finished run directory
    -> benchmark -> warm-started policy (+ frozen reference)
    -> Lightning fit: one epoch per round, data from GPORoundCallback, a checkpoint per round
    -> summary.json (status ok | no_signal | failed | diverged), then the final weights, + table

`python -m gpo_exp.run resume=<run dir>` continues a killed run from its last round checkpoint, in
its own directory and with its own config; a rerun into a partial directory with the same config
(a requeued SLURM job) does the same by itself.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpo_exp.training import rundir
from gpo_exp.config import register_configs
from gpo_exp.training.run_config import Resolved, validate
from gpo_exp.registry import ConfigError
from gpo_exp.models.tiny_context import check_fits
from gpo_exp.training import distributed
from gpo_exp.versions import check_versions

log = logging.getLogger("gpo_exp")

register_configs()
# Expected and harmless here: the frozen reference stays in eval mode; an all-equal batch is skipped.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# The round's examples are already tensors in memory; loader workers would only add start-up cost.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def apply_fast_dev_run(cfg: Resolved) -> None:
    """One round on a handful of prompts: a smoke test of the whole loop in seconds."""
    cfg.trainer.rounds = 1
    # a pretrained model's every failed trajectory costs ~K x steps continuations: fewer prompts keep it minutes
    cfg.gpo.prompts_per_round = min(cfg.gpo.prompts_per_round, 8 if cfg.model.source == "tiny" else 4)
    cfg.gpo.examples_per_round = min(cfg.gpo.examples_per_round, 8)
    cfg.trainer.eval_rows = min(cfg.trainer.eval_rows or 16, 16)
    cfg.trainer.eval_samples = min(cfg.trainer.eval_samples, 2)


def make_loggers(cfg: Resolved, run_dir: Path, config: dict[str, Any], wandb_id: str | None = None) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    loggers: list[Any] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.logger.wandb and cfg.logger.mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        group = cfg.logger.group
        if group is None and HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            group = Path(HydraConfig.get().sweep.dir).name
        wb = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=group,
                         name=run_dir.name, tags=[cfg.name, *cfg.logger.tags], mode=cfg.logger.mode,
                         save_dir=str(run_dir), config=config, id=wandb_id)  # resumed: the same wandb run (resume=allow)
        wb._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns that it has no effect
        loggers.append(wb)
    return loggers


def train(cfg: Resolved, run_dir: Path, config: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole experiment; returns the summary (also written to run_dir/summary.json by rank 0).

    A run directory with round checkpoints (a killed or preempted run with this config) is continued
    from the newest one. Non-finite weights or losses end the run with status `diverged`; a stop
    signal (SIGTERM, SIGUSR1) ends it after the next round's checkpoint with status `preempted`
    and no summary.json (the directory stays resumable)."""
    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.models.lora import is_lora
    from gpo_exp.rollout.backends import build_engine, check_backend, longest_prompt
    from gpo_exp.rollout.evaluate import headline_metric
    from gpo_exp.rollout.estimators import ESTIMATORS
    from gpo_exp.rollout.gpo_round import check_gpo
    from gpo_exp.rollout.sampler import PolicySampler
    from gpo_exp.training import checkpoint as ckpt
    from gpo_exp.training.datamodule import RolloutDataModule
    from gpo_exp.training.module import PolicyModule
    from gpo_exp.training.objectives import OPTIMIZERS
    from gpo_exp.training.rounds import Diverged, GPORoundCallback, no_signal_hint
    from gpo_exp.training.policy_setup import build_policy
    import pytorch_lightning as pl
    import torch
    import transformers

    for name in ("pytorch_lightning", "lightning_fabric"):  # imported after Hydra's logging setup, which they reset
        logging.getLogger(name).setLevel(logging.WARNING)
    t_start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # per-file load/save bars would drown the round log
    if rundir.is_finished(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds a finished run; refusing to overwrite it")
    rank0 = distributed.env_rank() == 0
    check_backend(cfg.engine, lora_r=cfg.model.lora_r, devices=cfg.trainer.devices, model=cfg.model,  # engine=vllm: one line, now
                  temperatures=[getattr(cfg.estimator, "temperature", None)])
    last = ckpt.latest(run_dir)
    if last is None and rank0:
        ckpt.clear_partial(run_dir)  # killed before its first round checkpoint: start that run over
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    benchmark = BENCHMARKS.build(asdict(cfg.benchmark))
    train_rows, test_rows = benchmark.load("train"), benchmark.load("test")
    if cfg.trainer.eval_rows is not None:
        test_rows = test_rows[: cfg.trainer.eval_rows]
    check_fits(cfg.model, benchmark, [*train_rows, *test_rows])  # before the warm start, not an IndexError in it

    objective = OPTIMIZERS.build(asdict(cfg.optimizer))
    estimator = ESTIMATORS.build(asdict(cfg.estimator)) if cfg.gpo.enabled else None
    check_gpo(cfg.gpo, estimator)  # settings that need the estimator: refused before the warm start loads
    t0 = time.perf_counter()
    policy, ref, tokenizer, value_head, ws = build_policy(cfg, benchmark, objective)
    ws_s = time.perf_counter() - t0
    log.info("warm start: %s (%.1fs)", ws["source"], ws_s)
    module = PolicyModule(policy, objective, ref=ref, value_head=value_head,
                          gradient_clip_val=cfg.trainer.gradient_clip_val)
    module.strict_loading = False  # resume checkpoints leave out the frozen weights (rebuilt above)

    max_prompt = (longest_prompt(tokenizer, benchmark, [*train_rows, *test_rows], cfg.model.chat_template)
                  if cfg.engine.backend == "vllm" else None)  # sizes vLLM's KV cache (engine.max_model_len=null)
    engine = build_engine(cfg.engine, policy, tokenizer, benchmark.cfg.max_new_tokens, run_dir / "vllm", seed=cfg.seed,
                          progress=cfg.trainer.progress_bar and rank0, max_prompt_len=max_prompt)
    steps = cfg.gpo.steps or benchmark.cfg.steps
    sampler = PolicySampler(engine, tokenizer, benchmark, steps, chat_template=cfg.model.chat_template, seed=cfg.seed)
    dm = RolloutDataModule(objective, tokenizer.pad_token_id, seed=cfg.seed)
    rounds = GPORoundCallback(sampler, estimator, objective, dm, cfg.gpo, train_rows, test_rows,
                              cfg.trainer.eval_samples, run_dir, cfg.seed, keep_checkpoints=cfg.trainer.keep_checkpoints,
                              eval_greedy=cfg.trainer.eval_protocol == "greedy")
    wandb_id_file = run_dir / ckpt.DIR / "wandb_id"
    wandb_id = wandb_id_file.read_text().strip() if last is not None and wandb_id_file.exists() else None
    strategy = cfg.trainer.strategy
    children: list[Any] = []
    watching = [True]
    if cfg.trainer.devices > 1:
        strategy = "ddp" if strategy == "auto" else strategy
        if not distributed.externally_launched():
            def rank_failed(why: str) -> None:  # rank 0 would wait for the dead rank forever
                if not watching:
                    return  # fit is over: rank 0 records how it ended itself
                print(f"error: {why}; stopping (run {run_dir})", file=sys.stderr, flush=True)
                rundir.record_failure(run_dir, "failed", why, config, cfg.name)
                os._exit(1)

            children = distributed.launch_ranks(cfg.trainer.devices, overrides or [], str(run_dir), rank_failed)
    loggers = make_loggers(cfg, run_dir, config, wandb_id)
    if last is not None and rank0:
        keep_csv_rows(loggers, run_dir, last[1])
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.rounds, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        strategy=strategy, use_distributed_sampler=False,  # the datamodule shards whole batches itself
        precision=cfg.trainer.precision,  # clipping: the module's (manual optimization)
        reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_val_batches=0,
        enable_checkpointing=False,  # round checkpoints come from GPORoundCallback (after its eval, before the next round's data)
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False,
        logger=loggers or False, callbacks=[*progress_bar(cfg), rounds], log_every_n_steps=1,  # bar first: see RoundBar
        default_root_dir=str(run_dir))
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
            rounds.wandb_id = lg.version
            wandb_id_file.parent.mkdir(parents=True, exist_ok=True)
            wandb_id_file.write_text(str(lg.version))
    if last is not None:
        log.info("resuming %s from its round %d checkpoint", run_dir, last[0])
    status, extra = "ok", {}
    try:
        with quiet_bars(cfg.trainer.progress_bar):
            trainer.fit(module, datamodule=dm, ckpt_path=str(last[1]) if last is not None else None,
                        weights_only=False)  # our own checkpoint: it holds the RNG states and the round history
    except FloatingPointError as e:  # Diverged (weights), or the module's non-finite loss
        status = "diverged"
        extra = {"error": rundir.one_line(e), "diverged_round": e.round if isinstance(e, Diverged) else rounds.round}
        log.info("diverged in round %d: %s", extra["diverged_round"], extra["error"])
    finally:
        watching.clear()
        for p in children:
            p.wait()
        if children:  # the next job of a multirun starts its own process group, on a fresh port
            distributed.end_ranks()

    if status == "ok" and rounds.history.rounds and rounds.history.totals["gpo/examples"] == 0:
        # Nothing was trained: the weights after are the weights before, whatever eval says.
        accs = [rec["rollout/train_accuracy"] for rec in rounds.history.rounds if "rollout/train_accuracy" in rec]
        status, extra = "no_signal", {"error": "no round produced a training example",
                                      "hint": no_signal_hint(sum(accs) / len(accs) if accs else 0.0)}
    summary = {"arm": cfg.name, "status": status, **extra, **rounds.summary(), "time/warmstart_s": ws_s,
               "headline_metric": f"eval/{headline_metric(cfg.trainer.eval_protocol)}_after",  # what report/sweepers read
               "warm_start/source": ws["source"], "train/skipped_batches": module.skipped_batches,
               "time/total_s": time.perf_counter() - t_start, "resumed_from_round": rounds.resumed_from,
               "config": config}
    if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu":  # what a GPU job needs to request
        summary["gpu/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if rounds.stopped_by_signal is not None:
        summary.update(status="preempted", stopped_after_round=rounds.stopped_by_signal, signal=rounds.stop_signal)
        return summary  # no summary.json: the directory stays resumable
    if not trainer.is_global_zero:
        return summary
    rundir.write_json_atomic(run_dir / "summary.json", summary)  # results first: a failed save below loses nothing
    if status in ("ok", "no_signal") and cfg.trainer.save_checkpoint:
        try:
            # LoRA: save the merged weights, so the checkpoint loads like any HF model (eval, next stage)
            saved = copy.deepcopy(policy).merge_and_unload() if is_lora(policy) else policy
            saved.save_pretrained(run_dir / "checkpoint")
            tokenizer.save_pretrained(run_dir / "checkpoint")
        except (OSError, RuntimeError) as e:
            summary["checkpoint_error"] = rundir.one_line(e)
            log.info("final checkpoint not saved (%s); the results are in summary.json", summary["checkpoint_error"])
            try:
                rundir.write_json_atomic(run_dir / "summary.json", summary)
            except OSError:
                pass
    if status == "ok" and cfg.trainer.save_checkpoint and "checkpoint_error" not in summary:
        shutil.rmtree(run_dir / ckpt.DIR, ignore_errors=True)  # finished, final weights saved: resume checkpoints are spent
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            lg.experiment.finish()
    return summary


def keep_csv_rows(loggers: list[Any], run_dir: Path, ckpt_path: Path) -> None:
    """Resume: keep metrics.csv's rows up to the checkpoint's step. Lightning's CSVLogger would delete the file
    (warning "Previous log files in this directory will be deleted"); the rows are set aside first (a kill in
    between loses nothing: the next resume reads them back), the old file removed, and the kept rows rewritten."""
    import csv

    import torch

    csv_loggers = [lg for lg in loggers if lg.__class__.__name__ == "CSVLogger"]
    path = run_dir / "csv" / "metrics.csv"
    aside = run_dir / ".metrics.csv.resume"  # outside csv/: the logger warns about any file there
    if not csv_loggers or not (path.is_file() or aside.is_file()):
        return
    if path.is_file():
        os.replace(path, aside)  # atomic: either file holds the rows at every moment
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    step, epoch = state.get("global_step", 0), state.get("epoch", 0)

    def before_checkpoint(row: dict[str, str]) -> bool:
        # a killed round's training rows share the checkpoint's step (the next step's index): epoch tells them apart
        for key, last in (("step", step), ("epoch", epoch)):
            try:
                if row.get(key) not in (None, "") and float(row[key]) > last:
                    return False
            except ValueError:
                pass
        return True

    with aside.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if before_checkpoint(r)]
    for p in path.parent.iterdir():  # hparams.yaml etc.: rewritten by the logger; an empty directory, no warning
        if p.is_file():
            p.unlink()
    writer = csv_loggers[0].experiment  # created now, on a directory holding only the set-aside rows
    writer.metrics.extend({k: v for k, v in r.items() if v != ""} for r in rows)
    writer.save()
    aside.unlink()


K_ESTIMATORS = ("mc", "bisect")  # estimators whose K (draws per probed prefix) is their main knob


def run_header(cfg: Resolved, run_dir: Path) -> str:
    """The run's first line: the arm and what it does (a baseline runs no estimator), and where it writes."""
    if cfg.gpo.enabled:
        k = getattr(cfg.estimator, "k", None)
        what = f"GPO, critical step by {cfg.estimator.name}" + (f" (K={k})" if cfg.estimator.name in K_ESTIMATORS else "")
    else:
        what = "baseline: whole-trajectory examples from the prompt, no critical step"
    smoke = (f" | fast_dev_run: 1 round, {cfg.gpo.prompts_per_round} prompts, {cfg.trainer.eval_rows} test rows"
             if cfg.trainer.fast_dev_run else f" | {cfg.trainer.rounds} rounds")
    return (f"arm {cfg.name} ({what}) | model {cfg.model.name} | benchmark {cfg.benchmark.name}{smoke}"
            f" | run dir {run_dir}")


def progress_bar(cfg: Resolved) -> list[Any]:
    """Lightning's bar, saying "round r/R" instead of "Epoch r-1/R-1"."""
    if not cfg.trainer.progress_bar:
        return []
    from pytorch_lightning.callbacks import TQDMProgressBar
    from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf

    class RoundBar(TQDMProgressBar):
        """One bar per round, created when the round's training starts and closed (kept as one line) when it
        ends. It runs before the round callback (the Trainer's callback list in `train`), so a round's bar is closed before that
        round's evaluation and the next round's data are logged: the console reads in order."""

        def __init__(self) -> None:
            super().__init__(leave=True)

        @property
        def train_description(self) -> str:
            return f"round {self.trainer.current_epoch + 1}/{self.trainer.max_epochs}"

        def on_train_start(self, *args: Any) -> None:
            pass  # no bar for the whole fit: each round gets its own

        def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
            self.train_progress_bar = self.init_train_tqdm()
            self.train_progress_bar.reset(convert_inf(self.total_train_batches))

    return [RoundBar()]


def quiet_bars(enabled: bool) -> Any:
    """While progress bars are on, log lines are written through tqdm (above the bar), so the round log
    and the bars never interleave on the console."""
    from contextlib import nullcontext

    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm() if enabled else nullcontext()


def hist_line(hist: list[int]) -> str:
    """'0:7 1:6 ... 11+:0': trajectories per critical step index (the last bin collects later steps)."""
    return " ".join(f"{i}{'+' if i == len(hist) - 1 else ''}:{n}" for i, n in enumerate(hist))


def print_table(summary: dict[str, Any], run_dir: Path) -> None:
    rows = [("arm", summary["arm"])]
    if summary.get("eval/accuracy_before") is not None:
        n = f" on {summary['eval/rows']} test rows" if summary.get("eval/rows") is not None else ""
        rows.append(("greedy accuracy", f"{summary['eval/accuracy_before']:.3f} -> {summary['eval/accuracy_after']:.3f}{n}"))
    if "eval/sampled_accuracy_before" in summary:
        rows.append(("sampled accuracy", f"{summary['eval/sampled_accuracy_before']:.3f} -> "
                                         f"{summary['eval/sampled_accuracy_after']:.3f}"))
    if "eval/diag/p_mistake_before" in summary:  # the noisy-teacher testbed: what happened at the planted trap
        rows += [("P(trap token | gold prefix)", f"{summary['eval/diag/p_mistake_before']:.3f} -> "
                                                 f"{summary['eval/diag/p_mistake_after']:.3f}"),
                 ("greedy failures at the trap", f"{summary['eval/diag/fail_trap_before']:.2f} -> "
                                                 f"{summary['eval/diag/fail_trap_after']:.2f}"),
                 ("collateral errors (share of rows)", f"{summary['eval/diag/collateral_rate_before']:.3f} -> "
                                                       f"{summary['eval/diag/collateral_rate_after']:.3f}")]
    rows += [("rounds", summary["rounds"]), ("training examples", int(summary["gpo/examples"])),
             ("generated tokens", int(summary["rollout/generated_tokens"]))]
    if summary.get("gpo/critical_step_hist") is not None:
        rows.append(("critical-step histogram", hist_line(summary["gpo/critical_step_hist"])))
        agree = summary.get("gpo/critical_agrees_first_error")
        rows.append(("critical == first wrong step", "n/a" if agree is None else
                     f"{agree:.2f} of {summary['gpo/agreement_n']} failed trajectories"))
        if summary.get("gpo/critical_is_pivot") is not None:
            rows.append(("critical == planted pivot", f"{summary['gpo/critical_is_pivot']:.2f} of "
                                                      f"{summary['gpo/pivot_n']} failures at the trap"))
        if summary.get("gpo/critical_agrees_reference") is not None:
            rows.append(("critical == mc reference", f"{summary['gpo/critical_agrees_reference']:.2f} of "
                                                     f"{summary['gpo/reference_n']} explored trajectories"))
    rows += [("time (warm start/rollout/train/eval/total)",
              "/".join(f"{summary[k]:.0f}" for k in ("time/warmstart_s", "time/rollout_s", "time/train_s",
                                                     "time/eval_s", "time/total_s")) + " s"),
             ("run directory", str(run_dir))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


class _Stop(Exception):
    """End main() with this exit code (in a multirun: record and go on to the next job, unless `stop_all`:
    a stop signal or Ctrl-C ends the whole sweep, whose rerun resumes the partial jobs)."""

    def __init__(self, code: int, stop_all: bool = False) -> None:
        self.code = code
        self.stop_all = stop_all


def signal_exit_code(name: str) -> int:
    """128 + the signal's number (SIGTERM 143, SIGUSR1 138): the shell's code for a process ended by that signal,
    so a wrapper or scheduler sees an interrupted job, not a finished one. Under sbatch the job is requeued
    (scontrol requeue) before this exit, and SLURM restarts a requeued job whatever its exit code."""
    import signal

    return 128 + int(signal.Signals[name])


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _log_to(run_dir: Path, enabled: bool) -> None:
    """Point the run's log file at run_dir/run.log (resume: the old run's log), or drop it (ranks > 0)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            if enabled:
                h.baseFilename = os.path.abspath(run_dir / "run.log")
            else:
                root.removeHandler(h)


def _log_traceback(exc: BaseException) -> None:
    """The full traceback goes to run.log only; the console gets one line."""
    text = "".join(traceback.format_exception(exc))
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(logging.makeLogRecord({"name": "gpo_exp", "levelno": logging.ERROR, "levelname": "ERROR",
                                           "msg": text}))


def _resume_config(run_dir: Path) -> tuple[DictConfig, list[str]]:
    saved = rundir.saved_config(run_dir)
    if saved is None:
        raise ConfigError(f"bad config resume={run_dir}: no run there (no {rundir.CONFIG}); give a run directory")
    overrides = rundir.saved_overrides(run_dir)
    return OmegaConf.create(saved), overrides


def run_job(dcfg: DictConfig) -> float:
    """One job: decide about the directory, validate, train, record. Raises _Stop to end with an exit code."""
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    run_dir = Path(hc.runtime.output_dir).resolve()
    rank0 = distributed.env_rank() == 0
    overrides = list(hc.overrides.task)
    config: dict[str, Any] | None = None
    if multirun and "Joblib" in str(hc.launcher.get("_target_", "")):
        import torch  # device_count() does not start CUDA, so CUDA_VISIBLE_DEVICES still applies

        gpu = distributed.claim_gpu(Path(hc.sweep.dir) / ".gpu_locks", torch.cuda.device_count())
        if gpu is not None:
            log.info("joblib worker %d: GPU %d", os.getpid(), gpu)
    explicit_resume = bool(dcfg.get("resume"))
    if explicit_resume:
        if rank0:
            rundir.remove_if_empty(run_dir)  # the directory Hydra made for this command is not used
        run_dir = Path(str(dcfg.resume)).resolve()
        try:
            dcfg, overrides = _resume_config(run_dir)
        except ConfigError as e:
            _error(str(e))
            raise _Stop(2) from None
        overrides = [f"resume={distributed.quote(str(run_dir))}"]  # what the other ranks need to run the same job
    if explicit_resume and rank0:
        rundir.reopen_failed(run_dir)  # resume=<dir> may continue a failed run from its checkpoints
    if rundir.is_finished(run_dir):
        _error(f"run directory {run_dir} already holds a finished run; refusing to overwrite it "
               "(nothing in it was changed)")
        raise _Stop(2)
    try:
        try:
            config = OmegaConf.to_container(dcfg, resolve=True)  # type: ignore[assignment]
        except Exception:  # noqa: BLE001 - an unresolvable value: validate() below names it
            config = None
        try:
            cfg = validate(dcfg)
        except ConfigError as e:
            if not explicit_resume:
                raise
            raise ConfigError(f"cannot resume {run_dir}: its saved config ({rundir.CONFIG}) does not validate with this "
                              f"version of gpo_exp ({e}); resume it with the version that started it, or fix that key "
                              f"in {run_dir / rundir.CONFIG}") from None
        if cfg.trainer.fast_dev_run:
            apply_fast_dev_run(cfg)
        saved = rundir.saved_config(run_dir)
        if saved is not None and (diff := rundir.differing_keys(saved, config, ignore=("resume",))):  # type: ignore[arg-type]
            raise ConfigError(f"run directory {run_dir} holds a partial run with other settings "
                              f"({', '.join(diff[:6])}); continue it with resume={run_dir} or pick another directory")
    except ConfigError as e:
        _error(str(e))
        if multirun and rank0:  # the sweep goes on; this job's directory says why it has no results
            rundir.write_hydra_files(run_dir, config or {}, overrides)
            rundir.record_failure(run_dir, "failed", f"ConfigError: {e}", config, str(dcfg.get("name")))
        elif rank0 and not explicit_resume:
            rundir.remove_if_empty(run_dir)
        raise _Stop(2) from None
    _log_to(run_dir, enabled=rank0)
    if rank0 and rundir.saved_config(run_dir) is None:
        try:
            rundir.write_hydra_files(run_dir, config, overrides, hc)  # type: ignore[arg-type]
        except OSError as e:  # read-only or full disk: nothing computed yet, nothing lost
            _error(f"cannot write to the run directory {run_dir}: {rundir.one_line(e)}")
            raise _Stop(2) from None
    log.info("%s", run_header(cfg, run_dir))
    try:
        summary = train(cfg, run_dir, config, overrides)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        if rank0:
            from gpo_exp.training.rounds import interrupted_line

            print(interrupted_line(run_dir), flush=True)
        raise _Stop(130, stop_all=True) from None
    except ConfigError as e:  # found once the data is loaded (a benchmark file, the tiny model's context)
        _error(str(e))
        if rank0:
            rundir.record_failure(run_dir, "failed", f"ConfigError: {e}", config, cfg.name)
        raise _Stop(2) from None
    except SystemExit as e:  # Lightning ends a Ctrl-C'd fit with sys.exit(1), after the callback printed where the run is
        raise _Stop(130 if e.code == 1 else int(e.code or 0), stop_all=True) from None
    except Exception as e:  # noqa: BLE001 - any failure: one line here, the traceback in run.log, a failed summary
        _error(f"{rundir.one_line(e)} (run {run_dir}; traceback in run.log)")
        _log_traceback(e)
        if rank0:
            rundir.record_failure(run_dir, "failed", rundir.one_line(e), config, cfg.name)
        raise _Stop(1) from None
    if summary["status"] == "preempted":
        if rank0:
            print(f"stopped by {summary['signal']} after round {summary['stopped_after_round']}; continue with: "
                  f"python -m gpo_exp.run resume={run_dir}", flush=True)
        distributed.requeue_if_slurm()
        raise _Stop(signal_exit_code(summary["signal"]), stop_all=True)
    if rank0:
        print_table(summary, run_dir)
    if summary["status"] == "no_signal":
        _error(f"run no_signal: {summary['error']}, so nothing was trained; {summary['hint']}")
        raise _Stop(3)
    if summary["status"] != "ok":
        _error(f"run {summary['status']}: {summary.get('error')} (round {summary.get('diverged_round')}); "
               f"results so far in {run_dir / 'summary.json'}")
        raise _Stop(1)
    return float(summary[summary["headline_metric"]])  # what sweepers (optuna) maximise: the run's headline


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    try:
        return run_job(dcfg)
    except _Stop as stop:
        if HydraConfig.get().mode.name == "MULTIRUN" and distributed.CHILD_ENV not in os.environ and not stop.stop_all:
            return float("nan")  # recorded in the job's directory; the sweep goes on to its next job
        sys.exit(stop.code)


def preflight(argv: list[str]) -> None:
    """Before Hydra makes the run directory (its failure is a traceback): can the output location be written?
    Checks the explicit hydra.run.dir / hydra.sweep.dir, else `outputs/`, by creating it and removing it again.
    First of all: are torch and transformers versions this code supports?"""
    try:
        check_versions()
    except ConfigError as e:
        _error(str(e))
        sys.exit(2)
    wanted = "outputs"
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            wanted = value.strip("'\"").split("${")[0] or "."
    target = Path(wanted)
    missing = []
    probe = target
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        test = target / f".gpo_exp_write_test_{os.getpid()}"
        test.write_text("")
        test.unlink()
    except OSError as e:
        _error(f"cannot write the output directory {wanted}: {rundir.one_line(e)}; choose another with "
               "hydra.run.dir=... (hydra.sweep.dir=... for -m)")
        sys.exit(2)
    finally:
        for d in missing:  # leave nothing behind: Hydra creates what the run needs
            try:
                d.rmdir()
            except OSError:
                break


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
