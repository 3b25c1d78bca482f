"""The validated run config: every section of the composed config as its dataclass.

The root schema and the run-level sections are declared in `gpo_exp.config`; the swappable groups
(`model`, `benchmark`, `estimator`, `optimizer`) are validated against the dataclass their registry
names. The optimizers' registry is the training layer's, hence this module lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpo_exp.benchmarks import BENCHMARKS
from gpo_exp.config import LoggerConfig, TrainerConfig, WarmStartConfig
from gpo_exp.models.config import ModelConfig
from gpo_exp.registry import to_dataclass
from gpo_exp.rollout.engine import EngineConfig
from gpo_exp.rollout.estimators import ESTIMATORS
from gpo_exp.rollout.gpo_round import GPOConfig
from gpo_exp.training.objectives import OPTIMIZERS


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
