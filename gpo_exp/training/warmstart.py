"""Supervised warm start: fine-tune the policy on worked solutions, cached by the config that made it.

GPO needs a policy that sometimes succeeds and sometimes fails. The embedded `tiny` model starts
from random weights, so the first run trains it on the benchmark's worked solutions and saves the
result under the cache directory, keyed by a hash of every setting that affects it; later runs load
it in seconds.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
import json
import logging
import math
import os
import shutil
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:  # config validation imports this module before transformers (imported where used)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.config import PRETRAINED_LR, TINY_LR, WarmStartConfig  # noqa: F401  (the run's warm_start section)
from gpo_exp.training.batching import pad_sequences, sequence_logps

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "warmstart"  # checkpoints shipped with the package


# Settings that change the warm-started weights: only these enter the cache key (see WEIGHT_FIELDS).
KEY_FIELDS = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "max_rows", "seed")
def cache_key(*parts: Any) -> str:
    """Short stable hash of JSON-able settings."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start_key(model_cfg: Any, benchmark_cfg: Any, cfg: WarmStartConfig) -> str:
    """Cache key of a warm start: only settings that change the trained weights enter it."""
    from gpo_exp.models.config import WEIGHT_FIELDS

    bench = (benchmark_cfg.weight_key() if hasattr(benchmark_cfg, "weight_key")  # a benchmark may drop its "off" fields
             else {k: v for k, v in asdict(benchmark_cfg).items() if k not in ("steps", "max_new_tokens", "max_rows")})
    model = {k: getattr(model_cfg, k) for k in WEIGHT_FIELDS}
    return cache_key(model, bench, {k: getattr(cfg, k) for k in KEY_FIELDS})


def cached_dir(cfg: WarmStartConfig, key: str) -> Path:
    return Path(cfg.cache_dir).expanduser() / key


def load_cached(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    if not (path / "done").exists():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting (None: full precision)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def supervised_finetune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                        solutions: Sequence[list[int]], cfg: WarmStartConfig,
                        progress: Callable[[int, float], None] | None = None, precision: str = "32-true") -> list[float]:
    """Train on prompt + solution + eos, loss on the solution tokens only, where the model's weights
    are (its device), under autocast for a mixed `precision`. Returns the loss curve."""
    rng = random.Random(cfg.seed)
    seqs = [p + s + [tokenizer.eos_token_id] for p, s in zip(prompts, solutions)]
    starts = [len(p) for p in prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

    device, amp = next(model.parameters()).device, autocast_dtype(precision)
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = rng.sample(range(len(seqs)), min(cfg.batch_size, len(seqs)))
        batch = pad_sequences([seqs[i] for i in idx], [starts[i] for i in idx], tokenizer.pad_token_id)
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            logp, n = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        loss = -(logp.sum() / n.sum())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                    meta: dict[str, Any]) -> None:
    # Write to a private folder and rename it into place: parallel sweep jobs never see half a cache.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    (tmp / "done").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        tmp.rename(path)
    except OSError:  # another job finished the same checkpoint first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def warm_start(model_cfg: Any, benchmark: Any, cfg: WarmStartConfig,
               progress: Callable[[int, float], None] | None = None, device: torch.device | None = None,
               precision: str = "32-true") -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The warm-started policy for (model, benchmark): loaded from cache, or trained and cached.

    Lookup order: the user cache, then checkpoints shipped in gpo_exp/assets (made by this same
    function; see `python -m gpo_exp.warmstart`), then training. Returns (model, tokenizer, info).
    `warm_start.enabled=auto` trains only models built from random weights (tiny); a pretrained
    model asked to warm-start explicitly trains on `device` (the trainer's) at its own lr, under the
    trainer's `precision`. Tiny always trains on the CPU, where its shipped checkpoint was made.
    """
    from gpo_exp.models import build_base
    from gpo_exp.models.prompting import encode_prompt

    pretrained = model_cfg.source != "tiny"
    cfg = cfg.resolved(pretrained=pretrained)
    key = warm_start_key(model_cfg, benchmark.cfg, cfg)
    info: dict[str, Any] = {"key": key, "source": "none", "seconds": 0.0}
    if pretrained and (not cfg.enabled or cfg.steps == 0):  # a pretrained model as it is: no rows needed
        model, tok = build_base(model_cfg, [], device)
        return model, tok, info
    rows = benchmark.load("train")
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if not cfg.enabled or cfg.steps == 0:
        model, tok = build_base(model_cfg, [benchmark.prompt(r) + r.get("solution", "") for r in rows], device)
        return model, tok, info
    for path, source in ((cached_dir(cfg, key), "cache"), (SHIPPED / key, "shipped")):
        if not cfg.force and (loaded := load_cached(path)) is not None:
            log.info("warm start: loaded %s checkpoint %s", source, path)
            return loaded[0], loaded[1], {**info, "source": source, "path": str(path)}
    if any("solution" not in r for r in rows):
        raise ValueError(f"benchmark {benchmark.name} has no worked solutions; set warm_start.enabled=false")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok = build_base(model_cfg, [benchmark.prompt(r) + r["solution"] for r in rows], device)
    if pretrained:
        model.to(device or torch.device("cpu"))
        log.info("warm start: supervised fine-tuning of pretrained %s on %s: %d steps, lr %g, precision %s",
                 model_cfg.name, next(model.parameters()).device, cfg.steps, cfg.lr, precision)
    prompts = [encode_prompt(tok, benchmark.prompt(r), model_cfg.chat_template) for r in rows]
    solutions = [tok(r["solution"], add_special_tokens=False).input_ids for r in rows]
    losses = supervised_finetune(model, tok, prompts, solutions, cfg, progress,
                                 precision=precision if pretrained else "32-true")
    seconds = time.perf_counter() - t0
    path = cached_dir(cfg, key)
    save_checkpoint(model, tok, path, {"key": key, "seconds": seconds, "final_loss": losses[-1] if losses else None,
                                       "model": asdict(model_cfg), "warm_start": asdict(cfg)})
    log.info("warm start: trained %d steps in %.0fs (final loss %.3f), saved to %s", cfg.steps, seconds,
             losses[-1] if losses else float("nan"), path)
    return model, tok, {**info, "source": "trained", "path": str(path), "seconds": seconds,
                        "final_loss": losses[-1] if losses else None}


def main(argv: list[str] | None = None) -> None:
    """`python -m gpo_exp.training.warmstart [--ship] [overrides]`: (re)train the warm start of the
    config that `python -m gpo_exp.run [overrides]` composes (default: the testbed) and report it.

    --ship copies the checkpoint into gpo_exp/assets/warmstart/<key>, which is how the shipped
    checkpoints were made (`... --ship` for the default, `... --ship experiment=arith_clean` for the clean one).
    """
    import argparse

    from hydra import compose, initialize_config_dir

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.config import register_configs
    from gpo_exp.training.run_config import validate

    ap = argparse.ArgumentParser(description="Train the warm start of a run config (default: tiny model on the testbed).")
    ap.add_argument("--ship", action="store_true", help="copy the result into gpo_exp/assets/warmstart/")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m gpo_exp.run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=args.overrides))
    torch.set_num_threads(cfg.trainer.cpu_threads or (1 if cfg.model.source == "tiny" else torch.get_num_threads()))
    benchmark = BENCHMARKS.build(asdict(cfg.benchmark))
    model, tok, info = warm_start(cfg.model, benchmark, replace(cfg.warm_start, force=True),
                                  progress=lambda s, l: log.info("step %d loss %.4f", s, l) if s % 100 == 0 else None)
    print(json.dumps(info, indent=2, default=str))
    if args.ship:
        dest = SHIPPED / info["key"]
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(info["path"], dest)
        print(f"shipped to {dest}")


if __name__ == "__main__":
    main()
