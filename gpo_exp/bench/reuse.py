"""`python -m gpo_exp.bench.reuse [--variants V1,V2,...] [--optimizers dpo,grpo,ppo] [overrides]`: training
examples per generated token, one round per GPO data variant.

Each variant collects one round (collect_round) on the same prompts with the same policy (the run
config's warm start) and sampling seed, then builds the examples each optimizer would train on
(`training.examples.round_examples`), both under the run's caps (examples_per_round, ...) and
uncapped (what the round's data could yield). Printed per variant: generated tokens (fresh
trajectories / estimation / reset), tokens relative to the baseline's, and examples per 1k
generated tokens per optimizer. A variant is `name` or `name:key=value:key=value` with gpo.* keys;
the built-in names are below. Unknown names or keys stop with one line.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"enabled": False},
    "replace_all": {"mix": "replace", "reuse": "critical", "max_token_ratio": None},  # GPO before gpo.mix existed
    "augment_all": {"mix": "augment", "reuse": "critical", "max_token_ratio": None},
    "tree_all": {"mix": "augment", "reuse": "tree", "max_token_ratio": None},
    "augment": {"mix": "augment", "reuse": "critical"},  # the defaults: token budget max_token_ratio
    "tree": {"mix": "augment", "reuse": "tree"},
    "substitute": {"mix": "substitute", "reuse": "critical"},
}
DEFAULT = "baseline,replace_all,augment_all,tree_all,augment,tree,substitute"


def parse_variant(spec: str, gpo_fields: set[str]) -> tuple[str, dict[str, Any]]:
    from gpo_exp.bench import parse_key_value

    name, *kvs = spec.split(":")
    if name not in VARIANTS and not kvs:
        raise SystemExit(f"--variants: unknown variant {name!r}; allowed: {', '.join(VARIANTS)} or NAME:KEY=VALUE:...")
    over = dict(VARIANTS.get(name, {}))
    for kv in kvs:
        key, val = parse_key_value(kv, "--variants")
        if key not in gpo_fields:
            raise SystemExit(f"--variants: {key!r} is not a gpo field; allowed: {', '.join(sorted(gpo_fields))}")
        over[key] = val
    return spec, over


def main(argv: list[str] | None = None) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.config import register_configs
    from gpo_exp.training.run_config import validate
    from gpo_exp.rollout.engine import HFRolloutEngine
    from gpo_exp.rollout.estimators import ESTIMATORS
    from gpo_exp.rollout.gpo_round import GPOConfig, check_gpo, collect_round
    from gpo_exp.rollout.sampler import PolicySampler
    from gpo_exp.training.examples import round_examples
    from gpo_exp.training.objectives import OPTIMIZERS
    from gpo_exp.training.warmstart import warm_start

    args = list(sys.argv[1:] if argv is None else argv)
    opts = {"--variants": DEFAULT, "--optimizers": "dpo,grpo,ppo"}
    for flag in opts:
        if flag in args:
            i = args.index(flag)
            opts[flag] = args[i + 1]
            args = args[:i] + args[i + 2:]
    gpo_fields = {f.name for f in fields(GPOConfig)}
    variants = [parse_variant(v, gpo_fields) for v in opts["--variants"].split(",")]
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=args))
    torch.set_num_threads(cfg.trainer.cpu_threads or 1)
    bench = BENCHMARKS.build(asdict(cfg.benchmark))
    objectives = {}
    for name in opts["--optimizers"].split(","):
        yaml_path = Path(__file__).resolve().parents[2] / "conf" / "optimizer" / f"{name}.yaml"
        if not yaml_path.exists():
            raise SystemExit(f"--optimizers: unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS.names())}")
        from omegaconf import OmegaConf
        objectives[name] = OPTIMIZERS.build(OmegaConf.to_container(OmegaConf.load(yaml_path)))
    model, tok, info = warm_start(cfg.model, bench, cfg.warm_start)
    engine = HFRolloutEngine(model, tok.eos_token_id, tok.pad_token_id, cfg.engine,
                             default_max_new_tokens=bench.cfg.max_new_tokens)
    sampler = PolicySampler(engine, tok, bench, bench.cfg.steps, chat_template=cfg.model.chat_template)
    rows = random.Random(cfg.seed * 100_003 + 1).sample(bench.load("train"), cfg.gpo.prompts_per_round)
    estimator = ESTIMATORS.build(asdict(cfg.estimator))
    out: dict[str, Any] = {"warm_start": info["key"], "prompts": len(rows), "estimator": cfg.estimator.name,
                           "variants": {}}
    for label, over in variants:
        gpo = replace(cfg.gpo, **over)
        check_gpo(gpo, estimator)
        sampler.seed = cfg.seed * 1_000_003 + 1
        t0 = time.perf_counter()
        data = collect_round(rows, sampler, estimator if gpo.enabled else None, gpo, seed=sampler.seed)
        s = data.stats
        rec: dict[str, Any] = {
            "seconds": round(time.perf_counter() - t0, 2),
            # estimation = what the engine generated for it (draws shared by sibling trajectories count once)
            "tokens": {"total": s["rollout/round_generated_tokens"], "trajectories": s["rollout/trajectory_tokens"],
                       "estimation": s["rollout/round_generated_tokens"] - s["rollout/trajectory_tokens"]
                       - s.get("gpo/reset_tokens", 0), "reset": s.get("gpo/reset_tokens", 0)},
            "localised": s.get("gpo/explored"), "groups": {src: sum(g.source == src for g in data.groups)
                                                            for src in ("fresh", "reset", "tree")},
            "examples": {}, "examples_per_1k_tokens": {}}
        uncapped = replace(gpo, examples_per_round=10**9, reset_examples=None, tree_examples=None)
        for name, obj in objectives.items():
            capped, by = round_examples(obj, data.groups, gpo, random.Random(0))
            free, by_free = round_examples(obj, data.groups, uncapped, random.Random(0))
            rec["examples"][name] = {"capped": by, "uncapped": by_free}
            k = rec["tokens"]["total"] / 1000
            rec["examples_per_1k_tokens"][name] = {"capped": round(len(capped) / k, 2), "uncapped": round(len(free) / k, 2)}
        out["variants"][label] = rec
        print(json.dumps({label: rec}, default=float), flush=True)
    base = out["variants"].get("baseline")
    if base:
        for rec in out["variants"].values():
            rec["tokens_vs_baseline"] = round(rec["tokens"]["total"] / base["tokens"]["total"], 2)
    print(json.dumps(out, indent=2, default=float))
    print(table(out))
    return out


def table(out: dict[str, Any]) -> str:
    """A markdown table: tokens and examples per 1k generated tokens (capped / uncapped) per variant."""
    names = list(next(iter(out["variants"].values()))["examples_per_1k_tokens"])
    lines = ["| variant | tokens (traj / est. / reset) | x baseline | localised | "
             + " | ".join(f"{n} ex./1k tok (cap / all)" for n in names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for label, r in out["variants"].items():
        t = r["tokens"]
        lines.append(f"| {label} | {t['total']} ({t['trajectories']} / {t['estimation']} / {t['reset']}) | "
                     f"{r.get('tokens_vs_baseline', '')} | {r['localised'] if r['localised'] is not None else ''} | "
                     + " | ".join(f"{r['examples_per_1k_tokens'][n]['capped']} / {r['examples_per_1k_tokens'][n]['uncapped']}"
                                  for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
