"""Every config file composes and validates; bad values stop the run with one line."""
from __future__ import annotations

import pytest

from gpo_exp.training.run_config import validate
from gpo_exp.registry import ConfigError
from tests.conftest import CONF_DIR

GROUPS = ["model", "benchmark", "optimizer", "estimator", "gpo", "trainer", "logger", "engine", "warm_start",
          "experiment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_file_composes_and_validates(compose, group, option):
    overrides = [f"{group}={option}"]  # experiment/debug default to null in config.yaml
    if group == "model" and option == "hf":
        overrides.append("model.path=/some/local/dir")
    cfg = compose(overrides)
    resolved = validate(cfg)
    if group in ("model", "benchmark", "optimizer", "estimator"):
        assert getattr(resolved, group).name == cfg[group].name


def test_default_config_is_gpo_dpo_on_arith(compose):
    cfg = validate(compose())
    assert (cfg.name, cfg.model.name, cfg.benchmark.name, cfg.optimizer.name, cfg.estimator.name) == \
        ("gpo-dpo", "tiny", "arith", "dpo", "mc")
    assert cfg.optimizer.beta == 0.1 and cfg.estimator.k == 4 and cfg.gpo.enabled is True


def test_gpo_disabled_names_the_baseline_arm(compose):
    assert validate(compose(["gpo.enabled=false", "optimizer=simpo"])).name == "simpo"


@pytest.mark.parametrize("override,needle", [
    ("estimator.k=0", "estimator.k=0"),
    ("optimizer.beta=-1", "optimizer.beta=-1"),
    ("optimizer.loss_type=nope", "optimizer.loss_type='nope'"),
    ("gpo.reset_samples=0", "gpo.reset_samples=0"),
    ("estimator.select=nope", "estimator.select='nope'"),
    ("+benchmark.bogus=1", "bogus"),
])
def test_bad_values_raise_one_line_naming_the_key(compose, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_unknown_group_option_lists_the_available_ones(compose):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose(["optimizer=nope"])
    assert "dpo" in str(err.value) and "simpo" in str(err.value)


def test_empty_split_stops_with_a_clear_message():
    from gpo_exp.benchmarks import get

    with pytest.raises(ConfigError, match="split 'test' is empty"):
        get("arith", sizes={"train": 10, "val": 0, "test": 0}).load("test")
