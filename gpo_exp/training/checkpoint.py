"""Round-boundary resume checkpoints: where they live, atomic writes, pruning, RNG state, cleanup.

    <run>/resume/round003.ckpt   Lightning checkpoint after round 3's training and evaluation:
                                 trainable weights (policy or LoRA adapters, value head), optimizer and
                                 scheduler state, loop counters, the round callback's state (history,
                                 counters, every RNG, the wandb run id) and the datamodule's state.

Round r+1's data is generated after the checkpoint, from the weights and seeds alone, so a resumed
run regenerates exactly what the killed one would have (`truncate_partial` drops the killed round's files).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIR = "resume"
_NAME = re.compile(r"round(\d{3,})\.ckpt")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of the run's finished checkpoints, oldest first (half-written `.tmp` files excluded)."""
    d = Path(run_dir) / DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def latest(run_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save(trainer: Any, run_dir: Path, r: int, keep: int) -> Path | None:
    """Write round r's checkpoint as temp + rename (a kill never leaves a torn checkpoint), then keep the newest
    `keep`. Called on every rank (the strategy gathers sharded state); rank 0 writes, renames and prunes."""
    if keep <= 0:
        return None
    d = Path(run_dir) / DIR
    final = d / f"round{r:03d}.ckpt"
    tmp = d / f".round{r:03d}.ckpt.tmp"
    if trainer.is_global_zero:
        d.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(tmp))  # ends with a barrier: the file is complete on rank 0
    if trainer.is_global_zero:
        os.replace(tmp, final)
        for _, old in checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    trainer.strategy.barrier("gpo_exp.checkpoint")
    return final


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_partial(run_dir: Path, rounds: list[dict[str, Any]], last_round: int) -> list[str]:
    """Make the run directory agree with a checkpoint taken after `last_round`: rounds.jsonl holds exactly the
    checkpoint's records, and round files of later rounds (a killed round's) are removed. Returns what was cut."""
    run_dir = Path(run_dir)
    cut = []
    path = run_dir / "rounds.jsonl"
    old = path.read_text().splitlines() if path.exists() else []
    new = [json.dumps(r, default=float) for r in rounds]
    if old != new:
        cut.append(f"rounds.jsonl ({len(old)} -> {len(new)} lines)")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in new))
        os.replace(tmp, path)
    for p in sorted((run_dir / "rounds").glob("round*_*.jsonl")):
        m = re.match(r"round(\d+)_", p.name)
        if m and int(m.group(1)) > last_round:
            p.unlink()
            cut.append(f"rounds/{p.name}")
    for p in (run_dir / DIR).glob(".*.tmp") if (run_dir / DIR).is_dir() else []:
        p.unlink()
    return cut


def clear_partial(run_dir: Path) -> None:
    """Remove what a run killed before its first checkpoint left behind, so it restarts cleanly."""
    run_dir = Path(run_dir)
    for name in ("rounds", DIR, "csv", "checkpoint"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / "rounds.jsonl").unlink(missing_ok=True)
