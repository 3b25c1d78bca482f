"""The run's structured config: fixed-schema sections as dataclasses, swappable groups via registries.

`gpo`, `trainer`, `logger`, `engine` and `warm_start` have one schema each (below, one comment per
field), registered with Hydra's ConfigStore so a typo in an override fails at compose time.
`model`, `benchmark`, `estimator` and `optimizer` change shape with their `name`; `validate`
merges each onto the dataclass its registry names and checks ranges, so the run stops at start
with one line naming the bad key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpo_exp.benchmarks import BENCHMARKS
from gpo_exp.models.config import ModelConfig
from gpo_exp.registry import check, to_dataclass
from gpo_exp.rollout.engine import EngineConfig
from gpo_exp.rollout.estimators import ESTIMATORS
from gpo_exp.rollout.evaluate import PROTOCOLS
from gpo_exp.rollout.gpo_round import GPOConfig
from gpo_exp.training.objectives import OPTIMIZERS
from gpo_exp.training.warmstart import WarmStartConfig


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

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "trainer.rounds", self.rounds, ">= 1")
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


@dataclass
class Resolved:
    """Validated dataclass instances for every section."""

    model: ModelConfig
    benchmark: Any
    optimizer: Any
    estimator: Any
    gpo: GPOConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    engine: EngineConfig
    warm_start: WarmStartConfig
    seed: int
    name: str


def arm_name(enabled: Any, optimizer: str) -> str:
    return f"gpo-{optimizer}" if str(enabled).lower() == "true" else str(optimizer)


def register_configs() -> None:
    """Register the root schema and the `arm` resolver with Hydra (idempotent)."""
    if not OmegaConf.has_resolver("arm"):
        OmegaConf.register_new_resolver("arm", arm_name)
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def validate(cfg: DictConfig) -> Resolved:
    """Turn the composed config into validated dataclasses; raises ConfigError with one line."""
    get = lambda key: OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else {}  # noqa: E731
    return Resolved(
        model=to_dataclass(ModelConfig, get("model"), "model"),
        benchmark=BENCHMARKS.config(get("benchmark")),
        optimizer=OPTIMIZERS.config(get("optimizer")),
        estimator=ESTIMATORS.config(get("estimator")),
        gpo=to_dataclass(GPOConfig, get("gpo"), "gpo"),
        trainer=to_dataclass(TrainerConfig, get("trainer"), "trainer"),
        logger=to_dataclass(LoggerConfig, get("logger"), "logger"),
        engine=to_dataclass(EngineConfig, get("engine"), "engine"),
        warm_start=to_dataclass(WarmStartConfig, get("warm_start"), "warm_start"),
        seed=int(cfg.seed),
        name=str(cfg.name),
    )
