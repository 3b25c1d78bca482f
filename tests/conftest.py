"""Shared fixtures. Tests run offline: no hub, no wandb network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest, and parallel jobs do not oversubscribe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture
def compose():
    """compose(overrides) -> DictConfig of conf/config.yaml, like the command line would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gpo_exp.config import register_configs

    register_configs()

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()
