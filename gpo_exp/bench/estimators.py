"""How well and how cheaply each estimator finds the critical step, against ground truth.

    python -m gpo_exp.bench.estimators [--prompts 200] [--seed 0] [--arms mc:k=4:reuse_siblings=false,adaptive:k_max=16]

On arith the step checker knows each failed trajectory's first wrong step. For the same failed
trajectories of the warm-started policy, every estimator (mc at several K, bisect, adaptive, confidence, random)
locates a critical step; the table reports agreement with the first wrong step and with mc at K=16
(the reference), rollouts and generated tokens per trajectory, and seconds. Tie-breaks are random.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gpo_exp.bench import parse_key_value
from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
from gpo_exp.rollout.diagnostics import has_pivots, pivot_agreement, trajectory_classes
from gpo_exp.rollout.estimators import ESTIMATORS, agreement
from gpo_exp.rollout.sampler import PolicySampler
from gpo_exp.training.warmstart import WarmStartConfig, warm_start

TESTBED = Path(__file__).resolve().parents[2] / "conf" / "benchmark" / "arith_testbed.yaml"
# reuse_siblings=False is the paper's mc; True adds free samples from the prompt's other trajectories.
ARMS = [("mc", {"k": 4, "reuse_siblings": False}), ("mc", {"k": 8, "reuse_siblings": False}),
        ("mc", {"k": 16, "reuse_siblings": False}), ("mc", {"k": 4}), ("bisect", {"k": 4}),
        ("adaptive", {"prior": "none", "k_root": 24}),  # plain calibrated bisection (the previous default)
        ("adaptive", {}), ("confidence", {}), ("random", {})]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200, help="training prompts to sample trajectories from")
    ap.add_argument("--samples", type=int, default=4, help="trajectories per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=None,
                    help="comma list of NAME[:key=value...] estimator arms (default: the standard table)")
    ap.add_argument("--reference-k", type=int, default=16,
                    help="K of the mc reference on independent samples (0: skip it, agree_mc16 is then nan)")
    ap.add_argument("--n-embd", type=int, default=ModelConfig.n_embd, help="tiny model width (its warm start is trained if not cached)")
    ap.add_argument("--n-head", type=int, default=ModelConfig.n_head, help="tiny model attention heads")
    ap.add_argument("--show-misses", type=int, default=0, metavar="N",
                    help="print N late misses per arm: steps, values, and a continuation that succeeded after the first error")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    ap.add_argument("--testbed", action="store_true",
                    help="the noisy-teacher testbed (conf/benchmark/arith_testbed.yaml); adds agree_pivot")
    ap.add_argument("--bench", nargs="*", default=[], metavar="KEY=VALUE", help="arith settings, e.g. trap_p=0.5")
    args = ap.parse_args(argv)
    arms = parse_arms(args.arms) if args.arms else ARMS
    torch.set_num_threads(args.threads)

    bench_over = dict(parse_key_value(kv, "--bench") for kv in args.bench)
    if args.testbed:
        import yaml

        bench_over = {**{k: v for k, v in yaml.safe_load(TESTBED.read_text()).items() if k != "name"}, **bench_over}
    bench = get("arith", **bench_over)
    model, tok, _ = warm_start(ModelConfig(n_embd=args.n_embd, n_head=args.n_head), bench, WarmStartConfig())
    engine = HFRolloutEngine(model, tok.eos_token_id, tok.pad_token_id, EngineConfig(),
                             default_max_new_tokens=bench.cfg.max_new_tokens)
    sampler = PolicySampler(engine, tok, bench, bench.cfg.steps, chat_template=False, seed=args.seed)
    trajs = sampler.trajectories(bench.load("train")[: args.prompts], args.samples)
    failed = [t for t in trajs if t.reward == 0 and t.first_error is not None]
    failed_set = {id(t) for t in failed}
    print(f"{len(trajs)} trajectories, {len(failed)} failed with a known first wrong step "
          f"(first-error histogram: {_hist([t.first_error for t in failed])})")

    # The reference is mc with K=16 on independent samples (another sampling seed), so agreement with
    # it is not inflated by the estimators sharing their first draws with it.
    reference: list[int | None] = [None] * len(failed)
    if args.reference_k > 0:
        sampler.seed = args.seed + 10_000
        ref_est = ESTIMATORS.build({"name": "mc", "k": args.reference_k, "reuse_siblings": False})
        reference = [loc.critical for loc in ref_est.locate(failed, sampler, args.seed)]
        sampler.seed = args.seed
    results = []
    for name, over in arms:
        est = ESTIMATORS.build({"name": name, "tie_break": "random", **over})
        tok0, t0 = engine.stats.generated_tokens, time.perf_counter()
        locs = [loc for loc, t in zip(est.locate(trajs, sampler, seed=args.seed), trajs) if id(t) in failed_set]
        secs = time.perf_counter() - t0
        if args.show_misses:
            _show_late(name, locs, failed, tok, args.show_misses)
        agree = agreement(locs, failed)["agreement"]
        crit = [loc.critical for loc in locs]
        pivot = {}
        if has_pivots(bench.load("test")[:1], bench):  # failed trajectories whose first error is the planted trap
            hits, n = pivot_agreement(failed, locs, trajectory_classes(failed, bench, tok))
            pivot = {"agree_pivot": hits / n if n else float("nan"), "n_trap": n}
        results.append({
            "estimator": name + "".join(f" {k}={v}" for k, v in over.items()),
            "agree_first_error": agree, **pivot,
            "agree_mc16": (sum(a == b for a, b in zip(crit, reference)) / len(crit) if args.reference_k > 0
                           else float("nan")),
            "undetermined": sum(loc.status == "undetermined" for loc in locs) / len(locs),
            # the ceiling a value-based estimator works under: agreement where the values carried information
            "agree_determined": _mean([loc.critical == t.first_error for loc, t in zip(locs, failed)
                                       if loc.status != "undetermined"]),
            # determined misses: after the first wrong step (the value had not collapsed yet) or before it
            "late": _mean([loc.status != "undetermined" and loc.critical > t.first_error for loc, t in zip(locs, failed)]),
            "early": _mean([loc.status != "undetermined" and loc.critical < t.first_error for loc, t in zip(locs, failed)]),
            "rollouts_per_traj": sum(loc.rollouts for loc in locs) / len(locs),
            "tokens_per_traj": sum(loc.tokens for loc in locs) / len(locs),
            "generated_tokens": engine.stats.generated_tokens - tok0,
            "seconds": secs,
        })
    _print(results)
    return results


def parse_arms(spec: str) -> list[tuple[str, dict]]:
    """'mc:k=4:reuse_siblings=false,random' -> [("mc", {"k": 4, "reuse_siblings": False}), ("random", {})]."""
    out = []
    for arm in spec.split(","):
        name, *kvs = arm.split(":")
        out.append((name, dict(parse_key_value(kv, f"--arms {arm!r}") for kv in kvs)))
    return out


def _show_late(name: str, locs: list, trajs: list, tok, n: int) -> None:
    """Misses where the estimator's boundary lies after the first wrong step: what succeeded from there."""
    shown = 0
    for loc, t in zip(locs, trajs):
        if shown == n or loc.status == "undetermined" or loc.critical <= t.first_error:
            continue
        shown += 1
        values = ", ".join("-" if v is None else f"{v:.2f}" for v in loc.values)
        print(f"[{name}] {t.row.get('prompt')!r} (answer {t.row.get('answer')}): {t.text!r}; first wrong step "
              f"{t.first_error}, critical {loc.critical}; V = [{values}]")
        for i in sorted(loc.samples):
            wins = [c for c in loc.samples[i] if c.reward > 0]
            if i > t.first_error and wins:
                print(f"    succeeded from prefix {i}: {tok.decode(wins[0].ids, skip_special_tokens=True)!r}")
                break


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _hist(xs: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def _print(rows: list[dict]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
