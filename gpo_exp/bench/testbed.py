"""`python -m gpo_exp.bench.testbed [--round-cost ARMS] [overrides]`: the warm start of a run config.

Default: greedy and sampled accuracy on its test split (trainer.eval_rows rows, trainer.eval_samples
samples) and the testbed diagnostics (gpo.diagnostics_rows rows): teacher-forced P(mistake | gold
prefix) at the trap and the error classes of greedy failures. The warm start is loaded (or trained
and cached) as a run would.

--round-cost baseline,adaptive,confidence,mc: the cost of localisation, measured in one process: one
round's data collection (collect_round, same prompts, same policy, same seed) per arm, plus building
the optimizer's examples; wall seconds, generated tokens and samples, and agreement with the
planted pivot. Each arm is timed twice (a warm-up pass first) and the second pass is reported.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.config import register_configs
    from gpo_exp.training.run_config import validate
    from gpo_exp.rollout.diagnostics import eval_diagnostics
    from gpo_exp.rollout.engine import HFRolloutEngine
    from gpo_exp.rollout.evaluate import evaluate
    from gpo_exp.rollout.sampler import PolicySampler
    from gpo_exp.training.warmstart import warm_start

    args = list(sys.argv[1:] if argv is None else argv)
    arms = []
    if "--round-cost" in args:
        i = args.index("--round-cost")
        arms = args[i + 1].split(",")
        args = args[:i] + args[i + 2:]
    overrides = args
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=overrides))
    torch.set_num_threads(cfg.trainer.cpu_threads or 1)
    bench = BENCHMARKS.build(asdict(cfg.benchmark))
    rows = bench.load("test")[: cfg.trainer.eval_rows]
    model, tok, info = warm_start(cfg.model, bench, cfg.warm_start)
    engine = HFRolloutEngine(model, tok.eos_token_id, tok.pad_token_id, cfg.engine,
                             default_max_new_tokens=bench.cfg.max_new_tokens)
    sampler = PolicySampler(engine, tok, bench, bench.cfg.steps, chat_template=cfg.model.chat_template)
    if arms:
        return round_cost(cfg, sampler, bench, arms, info["key"])
    t0 = time.perf_counter()
    greedy: list = []
    out = {"warm_start": info["key"], "source": info["source"], "test_rows": len(rows),
           **{f"eval/{k}": v for k, v in evaluate(sampler, rows, cfg.trainer.eval_samples, greedy_out=greedy).items()}}
    out["eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out.update(eval_diagnostics(sampler, model, rows, cfg.gpo.diagnostics_rows, greedy=greedy))
    out["diagnostics_s"] = time.perf_counter() - t0
    print(json.dumps(out, indent=2, default=float))
    return out


def round_cost(cfg, sampler, bench, arms: list[str], key: str) -> dict:
    """collect_round + make_examples per arm on the same prompts: wall time, tokens, samples."""
    import random

    from gpo_exp.rollout.estimators import ESTIMATORS
    from gpo_exp.rollout.gpo_round import collect_round
    from gpo_exp.training.examples import round_examples
    from gpo_exp.training.objectives import OPTIMIZERS

    rows = random.Random(cfg.seed * 100_003 + 1).sample(bench.load("train"), cfg.gpo.prompts_per_round)
    objective = OPTIMIZERS.build(asdict(cfg.optimizer))
    engine = sampler.engine
    out: dict = {"warm_start": key, "prompts": len(rows), "arms": {}}
    for name in arms:
        gpo = replace(cfg.gpo, enabled=name != "baseline")
        est = None if name == "baseline" else ESTIMATORS.build({**asdict(cfg.estimator), "name": name}
                                                               if name == cfg.estimator.name else {"name": name})
        for _ in range(2):  # the first pass warms caches and allocators; report the second
            gen0, tok0, t0 = engine.stats.generated, engine.stats.generated_tokens, time.perf_counter()
            sampler.seed = cfg.seed * 1_000_003 + 1
            data = collect_round(rows, sampler, est, gpo, seed=sampler.seed)
            examples, _ = round_examples(objective, data.groups, gpo, random.Random(0))
            secs = time.perf_counter() - t0
        s = data.stats
        out["arms"][name] = {"seconds": round(secs, 2), "examples": len(examples),
                             "generated_tokens": engine.stats.generated_tokens - tok0,
                             "generated_samples": engine.stats.generated - gen0,
                             "critical_is_pivot": s.get("gpo/critical_is_pivot"), "pivot_n": s.get("gpo/pivot_n"),
                             "critical_agrees_first_error": s.get("gpo/critical_agrees_first_error")}
    base = out["arms"].get("baseline")
    for name, a in out["arms"].items():
        if base and name != "baseline":
            a["time_vs_baseline"] = round(a["seconds"] / base["seconds"], 2)
    print(json.dumps(out, indent=2, default=float))
    return out


if __name__ == "__main__":
    main()
