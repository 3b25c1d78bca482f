"""Data-parallel rounds: which rank this process is, its share of a round, and gathering the shares.

Ranks come from three places: processes this module launches itself (`launch_ranks`, so a Hydra
multirun job's ranks run that job and never relaunch the sweep), SLURM tasks (`srun`, the submitit
launcher with tasks_per_node = devices) and torchrun. Every rank generates its contiguous share of
the round's prompts and eval rows; `gather` all-gathers the shares so every rank holds the same round.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")

CHILD_ENV = "GPO_EXP_CHILD_RANK"  # set in processes started by launch_ranks


def env_rank() -> int:
    """This process's global rank before torch.distributed is up (0 when not data-parallel)."""
    for key in ("RANK", CHILD_ENV):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])
    return 0


def externally_launched() -> bool:
    """Ranks already exist (torchrun, srun with several tasks, or our own children): launch none."""
    return ("LOCAL_RANK" in os.environ or CHILD_ENV in os.environ
            or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1)


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank ([obj] without torch.distributed)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal only one rank received)."""
    return any(gather(bool(flag)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quote(value: str) -> str:
    """A Hydra override value that may hold '=', ',' or spaces (a sweep job's directory does)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_saved_env: dict[str, str | None] = {}


def end_ranks() -> None:
    """After a job whose ranks this process launched: leave the process group and restore the environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _saved_env.clear()


def launch_ranks(devices: int, overrides: Sequence[str], run_dir: str,
                 on_failure: Callable[[str], None] | None = None) -> list[subprocess.Popen]:
    """Start ranks 1..devices-1 running this job (`python -m gpo_exp.run <job overrides>`) in run mode,
    and make this process rank 0, as Lightning's subprocess launcher does but without re-running
    sys.argv (under `-m` that would relaunch the whole sweep in every child). A rank that dies calls
    `on_failure` (rank 0 would otherwise wait for it in the process group forever)."""
    _saved_env.update({k: os.environ.get(k) for k in _RANK_ENV})
    os.environ.update({"MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": str(_free_port()),
                       "NODE_RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(devices)})
    cmd = [sys.executable, "-m", "gpo_exp.run", *overrides, f"hydra.run.dir={quote(run_dir)}", "hydra.mode=RUN",
           "hydra.job_logging.root.handlers=[console]"]
    procs = []
    for r in range(1, devices):
        env = {**os.environ, "LOCAL_RANK": str(r), CHILD_ENV: str(r)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)  # rank 0 prints the run's lines
        procs.append(proc)

        def watch(p: subprocess.Popen = proc, rank: int = r) -> None:
            if p.wait() != 0 and on_failure is not None:
                on_failure(f"rank {rank} exited with code {p.returncode}")

        threading.Thread(target=watch, daemon=True).start()
    return procs


def requeue_if_slurm() -> bool:
    """Under a plain sbatch job (not submitit, whose own signal handler requeues), requeue this job:
    SLURM restarts it and the rerun resumes from the round checkpoint in the same directory."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or env_rank() != 0 or "SUBMITIT_EXECUTOR" in os.environ or os.environ.get("SUBMITIT_FOLDER"):
        return False
    try:
        return subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_claimed: Any = None  # this worker's GPU lock file, held for the process's life


def claim_gpu(lock_dir: Path, n_gpus: int) -> int | None:
    """Give this worker process a GPU of its own: the first free one (an flock'ed file per GPU under lock_dir),
    exported as CUDA_VISIBLE_DEVICES before CUDA starts. Kept for the worker's life (loky reuses workers, and
    CUDA cannot switch devices once initialised). None when there are no GPUs, the user chose devices
    already, or every GPU is taken (more workers than GPUs: they share, as before)."""
    import fcntl

    global _claimed
    if _claimed is not None:
        return int(os.environ["CUDA_VISIBLE_DEVICES"])
    if n_gpus <= 0 or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in range(n_gpus):
        f = (lock_dir / f"gpu{gpu}.lock").open("w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _claimed = f
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        return gpu
    return None
