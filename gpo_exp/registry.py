"""Name -> (config dataclass, implementation) registries, so one YAML name picks one class.

Every config group entry (`benchmark=arith`, `estimator=mc`, `optimizer=dpo`) is validated by merging
its YAML onto the registered dataclass: unknown keys and wrong types fail at start with one line.
"""
from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, Callable, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value. Its message is one line naming the key and what is allowed."""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type, Callable[..., T]]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: `@REGISTRY.register("mc", MCConfig)` on the class built from that config."""
        assert is_dataclass(config_cls), f"{config_cls} must be a dataclass"

        def wrap(impl: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = (config_cls, impl)
            return impl

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> tuple[type, Callable[..., T]]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}")
        return self._entries[name]

    def config(self, cfg: DictConfig | dict[str, Any]) -> Any:
        """Validate a config group (which must carry `name`) into its dataclass instance."""
        name = cfg["name"] if "name" in cfg else None
        config_cls, _ = self.entry(str(name))
        return to_dataclass(config_cls, cfg, prefix=self.kind)

    def build(self, cfg: DictConfig | dict[str, Any], **kwargs: Any) -> T:
        """Validate `cfg` and construct the registered implementation from it."""
        config_cls, impl = self.entry(str(cfg["name"]))
        return impl(to_dataclass(config_cls, cfg, prefix=self.kind), **kwargs)


def to_dataclass(config_cls: type, cfg: DictConfig | dict[str, Any], prefix: str = "") -> Any:
    """Merge `cfg` onto the dataclass schema; turn OmegaConf errors into a one-line ConfigError.

    The dataclass's __post_init__ checks ranges and raises ConfigError itself.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_cls), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        allowed = ", ".join(f.name for f in config_cls.__dataclass_fields__.values())  # type: ignore[attr-defined]
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad config {prefix}.{key}: {msg} (fields of {prefix}: {allowed})") from None


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Range check used by config dataclasses: raise a one-line ConfigError when `cond` fails."""
    if not cond:
        raise ConfigError(f"bad config {key}={value!r}: must be {allowed}")
