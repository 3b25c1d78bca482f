"""Base optimizers, registered by name; importing this package registers them all."""
from gpo_exp.training.objectives.base import OPTIMIZERS, Group, Objective, OptimizerConfig
from gpo_exp.training.objectives import preference  # noqa: F401  (registers dpo, ipo, simpo, orpo)
from gpo_exp.training.objectives import kto  # noqa: F401  (registers kto)
from gpo_exp.training.objectives import policy_gradient  # noqa: F401  (registers ppo, grpo)

__all__ = ["OPTIMIZERS", "Group", "Objective", "OptimizerConfig"]
