"""The run's structured config schema: the sections each layer declares, collected into one root.

`gpo` (rollout), `engine` (rollout) and the run-level `trainer`, `logger` and `warm_start` (declared
here) have one schema each (one comment per field), registered with Hydra's ConfigStore so a typo in
an override fails at compose time. `model`, `benchmark`, `estimator` and `optimizer` change shape
with their `name`: `gpo_exp.training.run_config.validate` merges each onto the dataclass its registry
names and checks ranges, so the run stops at start with one line naming the bad key.

This module imports only from the layers below training (rollout, models, benchmarks, registry), so
the training layer can use it without an import circle.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from gpo_exp.registry import check
from gpo_exp.rollout.engine import EngineConfig
from gpo_exp.rollout.evaluate import PROTOCOLS
from gpo_exp.rollout.gpo_round import GPOConfig


# Lightning strategies a run accepts (names as Lightning's StrategyRegistry spells them).
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "single_device", "fsdp", "deepspeed",
              "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
              "deepspeed_stage_3_offload")
# Sharded strategies: each rank would hold a shard of the weights, but the rollout engine generates with the
# whole policy on every rank (no gather-for-generation yet, as TRL's unwrap_model_for_generation does).
SHARDED = tuple(s for s in STRATEGIES if s.startswith(("fsdp", "deepspeed")))


@dataclass
class TrainerConfig:
    rounds: int = 5  # GPO rounds: generate with the current policy, then train on what it produced
    accelerator: str = "cpu"  # Lightning accelerator: cpu | gpu | auto
    devices: int = 1  # devices for training
    precision: str = "32-true"  # Lightning precision, e.g. bf16-mixed on GPUs
    gradient_clip_val: float = 1.0  # max gradient norm
    eval_rows: int | None = 300  # test rows evaluated before training and after every round (null: all)
    eval_samples: int = 4  # sampled completions per test row (sampled accuracy, pass@k, maj@k)
    eval_protocol: str = "greedy"  # greedy: headline greedy pass@1 (tiny) | sampled: no greedy decoding, headline pass@1 averaged over eval_samples samples at engine.temperature (reasoning models); see rollout/evaluate.py
    fast_dev_run: bool = False  # one round with tiny sizes: a smoke test of the whole loop
    save_checkpoint: bool = True  # save the final policy (HF format) in the run directory
    progress_bar: bool = True  # show progress bars for generation and training
    cpu_threads: int | None = None  # torch intra-op CPU threads; null: 1 for model=tiny (its matrices are too small to split; more threads oversubscribe cores), torch's default otherwise
    strategy: str = "auto"  # Lightning strategy for devices > 1: auto | ddp | fsdp | deepspeed_stage_2 | ... (see STRATEGIES)
    keep_checkpoints: int = 2  # round-boundary resume checkpoints kept in <run>/resume/ (the newest ones; 0: none written)

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "trainer.rounds", self.rounds, ">= 1")
        check(self.devices >= 1, "trainer.devices", self.devices, ">= 1")
        check(self.strategy in STRATEGIES, "trainer.strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        check(self.keep_checkpoints >= 0, "trainer.keep_checkpoints", self.keep_checkpoints, ">= 0")
        check(self.strategy not in SHARDED, "trainer.strategy", self.strategy,
              "auto or ddp: fsdp/deepspeed shard the weights, and generation here needs the whole policy on every "
              "rank (gathering it for generation is not implemented yet)")
        check(self.devices == 1 or self.strategy != "single_device", "trainer.strategy", self.strategy,
              "auto or ddp when trainer.devices > 1")
        check(self.accelerator in ("cpu", "gpu", "cuda", "mps", "tpu", "auto"), "trainer.accelerator",
              self.accelerator, "cpu, gpu, cuda, mps, tpu or auto")
        check(self.eval_samples >= 0, "trainer.eval_samples", self.eval_samples, ">= 0")
        check(self.eval_protocol in PROTOCOLS, "trainer.eval_protocol", self.eval_protocol, f"one of {', '.join(PROTOCOLS)}")
        check(self.eval_protocol != "sampled" or self.eval_samples >= 1, "trainer.eval_samples", self.eval_samples,
              ">= 1 for trainer.eval_protocol=sampled")
        check(self.eval_rows is None or self.eval_rows >= 1, "trainer.eval_rows", self.eval_rows, ">= 1 or null")
        check(self.cpu_threads is None or self.cpu_threads >= 1, "trainer.cpu_threads", self.cpu_threads, ">= 1 or null")


@dataclass
class LoggerConfig:
    wandb: bool = True  # log to Weights & Biases
    mode: str = "offline"  # wandb mode: offline (default, sync later with `wandb sync`) | online | disabled
    project: str = "gpo-exp"  # wandb project
    entity: str | None = None  # wandb entity (team); null: your default
    group: str | None = None  # wandb group; null: the sweep name for multiruns, else none
    tags: list[str] = field(default_factory=list)  # extra wandb tags (the arm is always added)
    csv: bool = True  # also write Lightning's metrics.csv in the run directory

    def __post_init__(self) -> None:
        check(self.mode in ("offline", "online", "disabled"), "logger.mode", self.mode, "offline, online or disabled")


TINY_LR = 3e-3  # warm_start.lr=null on a random-init model: fast enough to learn the task in 600 steps
PRETRAINED_LR = 2e-5  # warm_start.lr=null on a pretrained model: a format-teaching fine-tune that does not damage it


@dataclass
class WarmStartConfig:
    enabled: Any = "auto"  # auto: on for models built from random weights (tiny), off for pretrained ones | true | false
    steps: int = 600  # optimizer steps of supervised fine-tuning (600 on arith: 84% greedy, 72% sampled test accuracy)
    batch_size: int = 64  # sequences per step
    lr: float | None = None  # peak AdamW learning rate (linear warmup, cosine decay); null: 3e-3 for tiny, 2e-5 for pretrained models
    warmup_steps: int = 50  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_rows: int | None = None  # use at most this many training rows (None: all)
    cache_dir: str = "~/.cache/gpo_exp/warmstart"  # where warm-started checkpoints are kept
    force: bool = False  # retrain even when a cached checkpoint exists
    seed: int = 0  # seed of initialisation and batch order (separate from the GPO seed on purpose)

    def __post_init__(self) -> None:
        if isinstance(self.enabled, str) and self.enabled.lower() in ("true", "false"):
            self.enabled = self.enabled.lower() == "true"
        check(self.enabled in (True, False, "auto"), "warm_start.enabled", self.enabled, "auto, true or false")
        check(self.steps >= 0, "warm_start.steps", self.steps, ">= 0")
        check(self.batch_size >= 1, "warm_start.batch_size", self.batch_size, ">= 1")
        check(self.lr is None or self.lr > 0, "warm_start.lr", self.lr, "> 0 or null")

    def resolved(self, pretrained: bool) -> WarmStartConfig:
        """`auto` and a null lr made concrete for a pretrained or a random-init model."""
        enabled = (not pretrained) if self.enabled == "auto" else bool(self.enabled)
        lr = self.lr if self.lr is not None else (PRETRAINED_LR if pretrained else TINY_LR)
        return replace(self, enabled=enabled, lr=lr)


@dataclass
class RunConfig:
    """The root config. Swappable groups are validated by their registries in `validate`."""

    model: Any = None  # gpo_exp.models.config.ModelConfig fields
    benchmark: Any = None  # the registered benchmark's config (BENCHMARKS)
    optimizer: Any = None  # the registered optimizer's config (OPTIMIZERS)
    estimator: Any = None  # the registered estimator's config (ESTIMATORS)
    gpo: GPOConfig = field(default_factory=GPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    seed: int = 0  # seed of the GPO run (prompt order, sampling, training); the warm start has its own
    name: str = "${arm:${gpo.enabled},${optimizer.name}}"  # the arm's name, e.g. gpo-dpo or dpo
    resume: str | None = None  # a run directory to continue (from its last round checkpoint, with its own config); null: a new run


def arm_name(enabled: Any, optimizer: str) -> str:
    return f"gpo-{optimizer}" if str(enabled).lower() == "true" else str(optimizer)


def arm_label(name: Any, enabled: Any, estimator: Any, k: Any) -> str:
    """The arm as a directory name: gpo-dpo_mc-k4, gpo-dpo_random, dpo (a baseline uses no estimator)."""
    if str(enabled).lower() != "true":
        return str(name)
    return f"{name}_{estimator}" + ("" if k is None or str(k) in ("", "None", "null") else f"-k{k}")


# Overrides already spelled by other parts of a job's directory name (the arm, the benchmark, the seed).
_IN_ARM = ("optimizer", "optimizer.name", "gpo.enabled")
_IN_GPO_ARM = ("estimator", "estimator.name", "estimator.k")
_NOT_CONFIG = ("sweep", "launcher", "resume", "logger", "trainer.progress_bar")  # presets fixed across a sweep; where results are logged


def job_subdir(name: Any, enabled: Any, optimizer: Any, estimator: Any, k: Any, benchmark: Any, seed: Any,
               overrides: Any) -> str:
    """A multirun job's directory: <arm>/<benchmark>/<other overrides, as Hydra's override_dirname>/seed<seed>.

    Every override that is not already spelled by the arm, benchmark or seed is kept, so two jobs
    with different configs never share a directory (e.g. `-m optimizer.beta=0.1,0.5`)."""
    skip = {"seed", "benchmark", "benchmark.name", *_NOT_CONFIG}
    if str(name) == arm_name(enabled, optimizer):  # the default name spells optimizer and gpo.enabled
        skip.update(_IN_ARM)
    if str(enabled).lower() == "true":
        skip.update(_IN_GPO_ARM)
    rest = []
    for o in overrides or []:
        key, _, value = str(o).partition("=")
        key = key.lstrip("+~")
        if key in skip or key.startswith("hydra.") or key.startswith("logger."):
            continue
        rest.append(f"{key}={value}".replace("/", "_"))
    parts = [arm_label(name, enabled, estimator, k), str(benchmark), ",".join(sorted(rest)), f"seed{seed}"]
    return "/".join(p for p in parts if p)


def register_configs() -> None:
    """Register the root schema and the `arm`, `arm_label` and `job_subdir` resolvers (idempotent)."""
    for name, fn in (("arm", arm_name), ("arm_label", arm_label), ("job_subdir", job_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
