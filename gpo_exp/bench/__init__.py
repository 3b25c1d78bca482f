"""Throughput benchmarks, each a module run with `python -m gpo_exp.bench.<name>`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def parse_key_value(kv: str, where: str) -> tuple[str, Any]:
    """'beta=1.0' -> ("beta", 1.0), the value read as YAML; anything else stops with one line naming `where`."""
    import yaml

    key, sep, val = kv.partition("=")
    if not sep or not key:
        raise SystemExit(f"{where}: {kv!r} is not key=value (expected KEY=VALUE)")
    return key, yaml.safe_load(val)


def device_label(device: "torch.device") -> str:
    """What a bench ran on, for its printed summary: the GPU's name, or the CPU and its torch threads."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def parse_device(name: str) -> "torch.device":
    """--device as a torch.device; one line naming the value and what is allowed when it cannot be used."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device: {name!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible here; allowed: cpu")
    return device
