"""`python -m gpo_exp.run [overrides]`: warm start, GPO rounds, evaluation, summary.json.

    compose + validate config -> benchmark -> warm-started policy (+ frozen reference)
    -> Lightning fit: one epoch per round, data from GPORoundCallback -> summary.json + table
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpo_exp.config import Resolved, register_configs, validate
from gpo_exp.registry import ConfigError

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


def make_loggers(cfg: Resolved, run_dir: Path, config: dict[str, Any]) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    loggers: list[Any] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.logger.wandb and cfg.logger.mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        group = cfg.logger.group
        if group is None and HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            group = Path(HydraConfig.get().sweep.dir).name
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=group,
                                   name=run_dir.name, tags=[cfg.name, *cfg.logger.tags], mode=cfg.logger.mode,
                                   save_dir=str(run_dir), config=config))
    return loggers


def train(cfg: Resolved, run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The whole experiment; returns the summary (also written to run_dir/summary.json)."""
    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.models.lora import is_lora
    from gpo_exp.rollout.engine import HFRolloutEngine
    from gpo_exp.rollout.evaluate import headline_metric
    from gpo_exp.rollout.estimators import ESTIMATORS
    from gpo_exp.rollout.sampler import PolicySampler
    from gpo_exp.training.datamodule import RolloutDataModule
    from gpo_exp.training.module import PolicyModule
    from gpo_exp.training.objectives import OPTIMIZERS
    from gpo_exp.training.rounds import GPORoundCallback
    from gpo_exp.training.policy_setup import build_policy

    t_start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # per-file load/save bars would drown the round log
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"run directory {run_dir} already holds a finished run; refusing to overwrite it")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    benchmark = BENCHMARKS.build(asdict(cfg.benchmark))
    train_rows, test_rows = benchmark.load("train"), benchmark.load("test")
    if cfg.trainer.eval_rows is not None:
        test_rows = test_rows[: cfg.trainer.eval_rows]

    objective = OPTIMIZERS.build(asdict(cfg.optimizer))
    t0 = time.perf_counter()
    policy, ref, tokenizer, value_head, ws = build_policy(cfg, benchmark, objective)
    ws_s = time.perf_counter() - t0
    log.info("warm start: %s (%.1fs)", ws["source"], ws_s)
    module = PolicyModule(policy, objective, ref=ref, value_head=value_head,
                          gradient_clip_val=cfg.trainer.gradient_clip_val)

    engine = HFRolloutEngine(policy, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cfg=cfg.engine,
                             default_max_new_tokens=benchmark.cfg.max_new_tokens, progress=cfg.trainer.progress_bar)
    steps = cfg.gpo.steps or benchmark.cfg.steps
    sampler = PolicySampler(engine, tokenizer, benchmark, steps, chat_template=cfg.model.chat_template, seed=cfg.seed)
    estimator = ESTIMATORS.build(asdict(cfg.estimator)) if cfg.gpo.enabled else None
    dm = RolloutDataModule(objective, tokenizer.pad_token_id, seed=cfg.seed)
    rounds = GPORoundCallback(sampler, estimator, objective, dm, cfg.gpo, train_rows, test_rows,
                              cfg.trainer.eval_samples, run_dir, cfg.seed,
                              eval_greedy=cfg.trainer.eval_protocol == "greedy")
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.rounds, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,  # clipping: the module's (manual optimization)
        reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False,
        logger=make_loggers(cfg, run_dir, config) or False, callbacks=[rounds], log_every_n_steps=1,
        default_root_dir=str(run_dir))
    trainer.fit(module, datamodule=dm)

    summary = {"arm": cfg.name, "status": "ok", **rounds.summary(), "time/warmstart_s": ws_s,
               "headline_metric": f"eval/{headline_metric(cfg.trainer.eval_protocol)}_after",  # what report/sweepers read
               "warm_start/source": ws["source"], "train/skipped_batches": module.skipped_batches,
               "time/total_s": time.perf_counter() - t_start, "config": config}
    if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu":  # what a GPU job needs to request
        summary["gpu/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if cfg.trainer.save_checkpoint:
        # LoRA: save the merged weights, so the checkpoint loads like any HF model (eval, next stage)
        saved = copy.deepcopy(policy).merge_and_unload() if is_lora(policy) else policy
        saved.save_pretrained(run_dir / "checkpoint")
        tokenizer.save_pretrained(run_dir / "checkpoint")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    for lg in trainer.loggers:
        if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            lg.experiment.finish()
    return summary


def print_table(summary: dict[str, Any], run_dir: Path) -> None:
    rows = [("arm", summary["arm"])]
    if summary.get("eval/accuracy_before") is not None:
        rows.append(("greedy accuracy", f"{summary['eval/accuracy_before']:.3f} -> {summary['eval/accuracy_after']:.3f}"))
    if "eval/sampled_accuracy_before" in summary:
        rows.append(("sampled accuracy", f"{summary['eval/sampled_accuracy_before']:.3f} -> "
                                         f"{summary['eval/sampled_accuracy_after']:.3f}"))
    rows += [("rounds", summary["rounds"]), ("training examples", int(summary["gpo/examples"])),
             ("generated tokens", int(summary["rollout/generated_tokens"]))]
    if summary.get("gpo/critical_step_hist") is not None:
        rows.append(("critical-step histogram", summary["gpo/critical_step_hist"]))
        agree = summary.get("gpo/critical_agrees_first_error")
        rows.append(("critical == first wrong step", "n/a" if agree is None else
                     f"{agree:.2f} of {summary['gpo/agreement_n']} failed trajectories"))
        if summary.get("gpo/critical_agrees_reference") is not None:
            rows.append(("critical == mc reference", f"{summary['gpo/critical_agrees_reference']:.2f} of "
                                                     f"{summary['gpo/reference_n']} explored trajectories"))
    rows += [("time (warm start/rollout/train/eval/total)",
              "/".join(f"{summary[k]:.0f}" for k in ("time/warmstart_s", "time/rollout_s", "time/train_s",
                                                     "time/eval_s", "time/total_s")) + " s"),
             ("run directory", str(run_dir))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = validate(dcfg)
        if cfg.trainer.fast_dev_run:
            apply_fast_dev_run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    config = OmegaConf.to_container(dcfg, resolve=True)
    log.info("arm %s | model %s | benchmark %s | estimator %s (K=%s) | %d rounds | run dir %s", cfg.name,
             cfg.model.name, cfg.benchmark.name, cfg.estimator.name if cfg.gpo.enabled else "-",
             getattr(cfg.estimator, "k", "-"), cfg.trainer.rounds, run_dir)
    try:
        summary = train(cfg, run_dir, config)  # type: ignore[arg-type]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(summary, run_dir)
    return float(summary[summary["headline_metric"]])  # what sweepers (optuna) maximise: the run's headline


if __name__ == "__main__":
    main()
