"""Throughput benchmarks, each a module run with `python -m gpo_exp.bench.<name>`."""
from __future__ import annotations

from typing import Any


def parse_key_value(kv: str, where: str) -> tuple[str, Any]:
    """'beta=1.0' -> ("beta", 1.0), the value read as YAML; anything else stops with one line naming `where`."""
    import yaml

    key, sep, val = kv.partition("=")
    if not sep or not key:
        raise SystemExit(f"{where}: {kv!r} is not key=value (expected KEY=VALUE)")
    return key, yaml.safe_load(val)
