"""Expected generated tokens (and hours) of one GPO round, from the config, before submitting a GPU job.

    python -m gpo_exp.bench.round_cost experiment=paper_r1_7b_math [overrides] [--mean-tokens 4000]
        [--accuracy 0.5] [--steps 30] [--tokens-per-s hf=500 --tokens-per-s vllm=3363]
    python -m gpo_exp.bench.round_cost --from-run outputs/runs/<run>   # assumptions measured by a run; prints
                                                                      # predicted vs logged tokens

The model (per round; P prompts x N samples, L = mean completion tokens, p = share of trajectories that
succeed, n = steps of an explored trajectory, a continuation from prefix i runs for the rest of the
trajectory, L (n - i) / n tokens, and a reset step is uniform over the n steps):
  trajectories  P N L
  estimation    per explored trajectory ((1-p) P N of them with explore=failed), prefixes 1..n-1:
                  mc          K L (n-1)/2
                  bisect      K draws at each of ceil(log2 n) midpoints (~L/2 each)
                  adaptive    the confidence prior's hypothesis holding (0.91 on tiny, docs/testbed.md): a live probe
                              (~1/p draws) and a dead one (its risk-calibrated cap) at ~L/2 each
                  random, confidence   0
                plus, for mc and bisect, the prompt's K - (N-1) draws (siblings are free draws from it) once
                per prompt with a failure, (1 - p^N) P: the engine generates identical requests once
                (engine.dedup=false: once per explored trajectory). Deeper prefixes are assumed unshared (long
                chains); --from-run measures the share of them that siblings share (tiny on arith: many), and
                estimation and reset draws from a shared prefix are counted once
  reset         M draws from the reset prefix per explored trajectory: M L (n+1) / (2n)
  eval          R rows x (1 greedy if protocol=greedy + eval_samples) x L, once per round
With gpo.max_token_ratio set, estimation + reset are scaled down to (ratio - 1) P N L when they would
exceed it (the round stops localising once that budget is spent).
The baseline arm (gpo.enabled=false) generates the trajectories and the eval only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ESTIMATOR_NAMES = ("mc", "bisect", "adaptive", "random", "confidence")


@dataclass
class Setting:
    """Everything the prediction needs: config values plus the three assumptions (L, p, n)."""

    prompts: int  # gpo.prompts_per_round
    samples: int  # gpo.samples_per_prompt
    reset_samples: int  # gpo.reset_samples (M)
    k: int  # estimator.k (mc/bisect)
    explore_all: bool  # estimator.explore == all
    reuse_siblings: bool  # estimator.reuse_siblings
    eval_rows: int  # trainer.eval_rows (or the test split's size)
    eval_generations: int  # per eval row: greedy (1 or 0) + eval_samples
    max_new_tokens: int  # engine.max_new_tokens or the benchmark's
    mean_tokens: float  # L: mean completion tokens (assumed or measured)
    accuracy: float  # p: share of sampled trajectories that succeed (assumed or measured)
    steps: float  # n: steps of an explored trajectory (assumed or measured)
    dedup: bool = True  # engine.dedup: identical (prefix, sample) requests generated once
    shared: float = 0.0  # share of explored trajectories' prefixes 1..n-1 that another explored sibling has too (0: long chains; measured by --from-run)
    k_max: int = 32  # adaptive's cap per probe
    risk: float | None = 0.05  # adaptive's calibrated-probe risk
    max_token_ratio: float | None = None  # gpo.max_token_ratio: estimation + reset stop at (ratio - 1) x the trajectories' tokens (null: no budget)


def _explored(s: Setting) -> float:
    return s.prompts * s.samples * (1.0 if s.explore_all else 1.0 - s.accuracy)


def estimation_tokens(s: Setting, estimator: str) -> float:
    """Expected generated estimation tokens per round for `estimator` (see the module doc)."""
    L, n, p = s.mean_tokens, max(s.steps, 1.0), s.accuracy
    free = min(s.k, s.samples - 1) if s.reuse_siblings else 0  # siblings are free draws from the prompt
    # Draws from the prompt (prefix 0) are the same requests for every failed sibling: generated once a prompt.
    failing_prompts = s.prompts * (1.0 if s.explore_all else 1.0 - p ** s.samples) if s.dedup else _explored(s)
    if estimator == "mc":
        deep, root = s.k * L * (n - 1) / 2, (s.k - free) * L
    elif estimator == "bisect":
        deep, root = s.k * math.ceil(math.log2(n)) * L / 2, (s.k - free) * L
    elif estimator == "adaptive":
        cap = s.k_max if s.risk is None or p <= 0 else min(s.k_max, math.ceil(math.log(s.risk) / math.log(1 - min(p, 0.99))))
        deep, root = (min(1 / max(p, 1e-3), s.k_max) + cap) * L / 2, 0.0
    elif estimator in ("random", "confidence"):
        deep, root = 0.0, 0.0
    else:
        raise ValueError(f"unknown estimator {estimator!r}; modelled: {', '.join(ESTIMATOR_NAMES)}")
    unique = 1.0 - s.shared if s.dedup else 1.0  # a prefix two siblings share is drawn from once
    return _explored(s) * deep * unique + failing_prompts * max(root, 0.0)


def _budget(s: Setting, trajectory_tokens: float) -> float | None:
    return None if s.max_token_ratio is None else (s.max_token_ratio - 1.0) * trajectory_tokens


def round_tokens(s: Setting, estimator: str | None) -> dict[str, float]:
    """Tokens per round by phase; estimator None is the baseline arm (no estimation, no reset)."""
    n = max(s.steps, 1.0)
    out = {"trajectories": s.prompts * s.samples * s.mean_tokens,
           "estimation": 0.0 if estimator is None else estimation_tokens(s, estimator),
           "reset": 0.0 if estimator is None else (_explored(s) * s.reset_samples * s.mean_tokens * (n + 1) / (2 * n)
                                                   * (1.0 - s.shared if s.dedup else 1.0)),
           "eval": s.eval_rows * s.eval_generations * s.mean_tokens}
    spent, budget = out["estimation"] + out["reset"], _budget(s, out["trajectories"])
    if budget is not None and spent > budget:  # the round localises trajectories only until the budget is spent
        out["estimation"], out["reset"] = out["estimation"] * budget / spent, out["reset"] * budget / spent
    out["total"] = sum(out.values())
    return out


def setting_from_config(cfg: Any, mean_tokens: float | None, accuracy: float, steps: float | None,
                        eval_rows_default: int = 500) -> Setting:
    """A Setting from a validated run config; L defaults to half of max_new_tokens, n to the step cap
    (or L / min_tokens when fewer steps fit)."""
    steps_cfg = cfg.gpo.steps or cfg.benchmark.steps
    max_new = cfg.engine.max_new_tokens or cfg.benchmark.max_new_tokens
    L = mean_tokens if mean_tokens is not None else max_new / 2
    n = steps if steps is not None else float(max(1, min(steps_cfg.max_steps, int(L // steps_cfg.min_tokens))))
    greedy = 1 if cfg.trainer.eval_protocol == "greedy" else 0
    return Setting(prompts=cfg.gpo.prompts_per_round, samples=cfg.gpo.samples_per_prompt,
                   reset_samples=cfg.gpo.reset_samples, k=cfg.estimator.k, explore_all=cfg.estimator.explore == "all",
                   reuse_siblings=cfg.estimator.reuse_siblings, eval_rows=cfg.trainer.eval_rows or eval_rows_default,
                   eval_generations=greedy + cfg.trainer.eval_samples, max_new_tokens=max_new, mean_tokens=L,
                   accuracy=accuracy, steps=n, dedup=cfg.engine.dedup, k_max=getattr(cfg.estimator, "k_max", 32),
                   risk=getattr(cfg.estimator, "risk", 0.05), max_token_ratio=cfg.gpo.max_token_ratio)


PROMPT_TOKENS = 512  # assumed prompt length (chat template + a MATH problem) for the KV-cache estimate


def memory_gb(cfg: Any) -> dict[str, float] | None:
    """A lower bound on GPU memory for a preset with a known shape (models/random_init.SHAPES): bf16/fp32
    weights plus the generation KV cache of engine.batch_size sequences of prompt + max_new_tokens tokens.
    Training activations (gradient checkpointing, micro-batches), LoRA/optimizer state (small) and the
    allocator's slack are not counted."""
    from gpo_exp.models.random_init import SHAPES

    shape = SHAPES.get(cfg.model.path or "")
    if shape is None:
        return None
    width = 4 if cfg.model.dtype == "float32" else 2
    head_dim = shape.hidden_size // shape.num_attention_heads
    kv_per_token = shape.num_hidden_layers * 2 * shape.num_key_value_heads * head_dim * 2  # bf16 K and V
    tokens = cfg.engine.batch_size * (PROMPT_TOKENS + (cfg.engine.max_new_tokens or cfg.benchmark.max_new_tokens))
    out = {"weights": shape.params * width / 1e9, "kv_cache": kv_per_token * tokens / 1e9}
    out["total"] = out["weights"] + out["kv_cache"]
    return out


def measured_round(run_dir: Path) -> dict[str, Any]:
    """Round 1 of a finished run: the assumptions it measured (L, p, n of failed trajectories) and its tokens."""
    rec = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()][1]
    trajs = [json.loads(x) for x in (run_dir / "rounds" / "round001_trajectories.jsonl").read_text().splitlines()]
    failed = [t for t in trajs if t["reward"] == 0] or trajs
    prefixes = [(t["prompt"], "".join(t["steps"][:i])) for t in failed for i in range(1, len(t["steps"]))]
    traj, reset = rec["rollout/trajectory_tokens"], rec.get("gpo/reset_tokens", 0)
    return {"mean_tokens": traj / rec["rollout/trajectories"],
            "accuracy": rec["rollout/train_accuracy"], "steps": sum(len(t["steps"]) for t in failed) / len(failed),
            "shared": 1.0 - len(set(prefixes)) / len(prefixes) if prefixes else 0.0,
            "trajectories": rec["rollout/trajectories"],
            # generated by the engine (after deduplication); estimation is the rest of the round's tokens
            "tokens": {"trajectories": traj, "estimation": rec["rollout/round_generated_tokens"] - traj - reset,
                       "reset": reset, "total": rec["rollout/round_generated_tokens"]},
            "config": json.loads((run_dir / "summary.json").read_text())["config"]}


def _compose(overrides: Sequence[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from gpo_exp.config import register_configs
    from gpo_exp.training.run_config import validate

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def _rates(specs: Sequence[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        label, _, rate = spec.rpartition("=")
        out[label or f"{rate} tok/s"] = float(rate)
    return out


def table(s: Setting, estimators: Sequence[str], rates: dict[str, float], measured: dict[str, float] | None = None
          ) -> str:
    """Markdown: one row per arm (baseline + each estimator), tokens by phase, hours per round at each rate."""
    head = ["arm", "trajectories", "estimation", "reset", "eval", "total"] + [f"h/round @ {k}" for k in rates]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    for est in [None, *estimators]:
        t = round_tokens(s, est)
        cells = ["baseline (gpo off)" if est is None else est] + [f"{t[k]:,.0f}" for k in head[1:6]]
        lines.append("| " + " | ".join(cells + [f"{t['total'] / r / 3600:.2f}" for r in rates.values()]) + " |")
    if measured is not None:
        cells = ["measured"] + [f"{measured.get(k, 0):,.0f}" for k in ("trajectories", "estimation", "reset")]
        lines.append("| " + " | ".join(cells + ["-", f"{measured['total']:,.0f} (no eval)"] + ["-" for _ in rates]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m gpo_exp.bench.round_cost", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper_r1_7b_math")
    ap.add_argument("--mean-tokens", type=float, default=None, help="L, mean completion tokens (default: max_new_tokens / 2)")
    ap.add_argument("--accuracy", type=float, default=0.5, help="p, share of trajectories that succeed (default 0.5)")
    ap.add_argument("--steps", type=float, default=None, help="n, steps of an explored trajectory (default: max_steps, or L / min_tokens if fewer)")
    ap.add_argument("--eval-rows", type=int, default=500, help="test rows when trainer.eval_rows is null (default 500)")
    ap.add_argument("--tokens-per-s", action="append", default=[], metavar="[LABEL=]RATE",
                    help="generation rate for the hours column (repeatable)")
    ap.add_argument("--from-run", type=Path, default=None, help="a finished run: take L, p, n and the config from "
                    "its round 1 and print its logged tokens next to the prediction")
    args = ap.parse_args(argv)
    measured = None
    if args.from_run is not None:  # the run's own resolved config, and the assumptions its round 1 measured
        from omegaconf import OmegaConf

        from gpo_exp.training.run_config import validate

        m = measured_round(args.from_run)
        cfg = validate(OmegaConf.create(m["config"]))
        s = setting_from_config(cfg, m["mean_tokens"], m["accuracy"], m["steps"], args.eval_rows)
        s.shared, s.prompts = m["shared"], round(m["trajectories"] / s.samples)  # fast_dev_run shrinks the prompts
    else:
        cfg = _compose(args.overrides)
        s = setting_from_config(cfg, args.mean_tokens, args.accuracy, args.steps, args.eval_rows)
    rates = _rates(args.tokens_per_s)
    ests = [cfg.estimator.name] if args.from_run is not None else list(ESTIMATOR_NAMES)
    print(f"{cfg.model.name} on {cfg.benchmark.name}: P={s.prompts} prompts x N={s.samples}, M={s.reset_samples}, "
          f"K={s.k}, max_new_tokens={s.max_new_tokens}, eval {s.eval_rows} rows x {s.eval_generations}")
    print(f"assumed: L={s.mean_tokens:,.0f} tokens per completion, p={s.accuracy:.2f} succeed, n={s.steps:.1f} steps, "
          f"{s.shared:.0%} of deeper prefixes shared by siblings"
          f"{' (measured by ' + str(args.from_run) + ')' if args.from_run else ''}\n")
    if args.from_run is not None:
        measured = m["tokens"]
    print(table(s, ests, rates, measured))
    mem = memory_gb(cfg)
    if mem is not None:
        print(f"\nGPU memory, lower bound: weights {mem['weights']:.1f} GB + KV cache {mem['kv_cache']:.1f} GB "
              f"({cfg.engine.batch_size} sequences x {PROMPT_TOKENS}+{s.max_new_tokens} tokens) = {mem['total']:.1f} GB")
    out = {"setting": s.__dict__, "memory_gb": mem, "arms": {est or "baseline": round_tokens(s, est) for est in [None, *ests]}}
    if args.from_run is not None:
        pred = round_tokens(s, cfg.estimator.name if cfg.gpo.enabled else None)
        pred["total"] -= pred["eval"]  # the round's logged tokens exclude the evaluation
        ratio = {k: pred[k] / v for k, v in m["tokens"].items() if v}
        print("\npredicted / measured: " + ", ".join(f"{k} {r:.2f}" for k, r in ratio.items()))
        out["ratio"] = ratio
    return out


if __name__ == "__main__":
    from gpo_exp.registry import ConfigError

    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
