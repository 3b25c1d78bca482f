"""A run directory's life: new, partial (killed, resumable) or finished (immutable), and its records.

Nothing here imports torch, so `gpo_exp.run` decides about the directory before the heavy imports:
a finished run is refused without touching a file in it, an invalid config leaves no directory
behind, and a failed job still leaves a `summary.json` saying why (so a sweep never loses an arm).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

SUMMARY = "summary.json"
CONFIG = ".hydra/config.yaml"  # the job's resolved config, written by gpo_exp.run (hydra.output_subdir is null)
STATUSES = ("ok", "no_signal", "failed", "diverged")  # summary.json `status` (no_signal: finished, trained on nothing)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / SUMMARY).exists()


def write_json_atomic(path: Path, obj: Any) -> None:
    """temp + rename: a reader (or a kill) never sees half a summary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def write_hydra_files(run_dir: Path, config: dict[str, Any], overrides: list[str], hydra_cfg: Any = None) -> None:
    """What Hydra's own output_subdir would hold: config.yaml (resolved), overrides.yaml, hydra.yaml."""
    d = Path(run_dir) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (d / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if hydra_cfg is not None:
        from omegaconf import OmegaConf

        OmegaConf.save(hydra_cfg, d / "hydra.yaml")


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def differing_keys(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if not any(k == i or k.startswith(i + ".") for i in ignore) and fa.get(k) != fb.get(k)]


def remove_if_empty(run_dir: Path) -> None:
    """Remove an empty directory Hydra created for a run that never started (and empty parents it made)."""
    d = Path(run_dir)
    try:
        while d.is_dir() and not any(d.iterdir()) and d != Path.cwd():
            d.rmdir()
            d = d.parent
    except OSError:
        pass


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def record_failure(run_dir: Path, status: str, error: str, config: dict[str, Any] | None, arm: str | None,
                   extra: dict[str, Any] | None = None) -> bool:
    """summary.json for a run that did not finish; False when even that cannot be written (read-only disk)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(run_dir) / SUMMARY, {"arm": arm, "status": status, "error": error, **(extra or {}),
                                                    "config": config})
        return True
    except OSError:
        return False


def saved_overrides(run_dir: Path) -> list[str]:
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        out = yaml.safe_load(path.read_text()) if path.is_file() else []
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in out] if isinstance(out, list) else []


def reopen_failed(run_dir: Path) -> bool:
    """Explicit resume of a run that failed (not diverged) and still has round checkpoints: its failure record
    moves to failed_attempts.jsonl, so the directory is resumable again. A finished or diverged run stays closed."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if summary.get("status") != "failed" or not any((Path(run_dir) / "resume").glob("round*.ckpt")):
        return False
    with (Path(run_dir) / "failed_attempts.jsonl").open("a") as f:
        f.write(json.dumps({k: v for k, v in summary.items() if k != "config"}) + "\n")
    path.unlink()
    return True
