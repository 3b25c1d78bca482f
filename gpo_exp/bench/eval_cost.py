"""What `python -m gpo_exp.eval` costs against the run's own in-round evaluation of the same rows.

    python -m gpo_exp.bench.eval_cost <run dir> [--repeats 2] [--old]

Timings in one process, on the run's final checkpoint, interleaved `--repeats` times (medians):

  in-run      what GPORoundCallback._evaluate generates: rollout.evaluate on the run's eval rows with
              the run's protocol and samples, one CPU thread for the tiny model (policy_setup's rule)
  eval        `gpo_exp.eval checkpoint=<run>/checkpoint` as it is now (the run's config by default)
  eval-old    (--old) what the README's eval example did before it read the run: every CPU thread and
              the stand-alone defaults (4 samples per row on top of greedy) on the same benchmark and rows

It checks that eval's headline equals the run's reported `eval/<metric>_after` and prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from gpo_exp.training import rundir


def time_in_run(run_dir: Path) -> tuple[float, dict[str, float]]:
    """The in-round evaluation's generation and grading, rebuilt from the run's config and checkpoint."""
    from dataclasses import asdict

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.eval import read_run
    from gpo_exp.models import load_hub
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
    from gpo_exp.rollout.evaluate import evaluate
    from gpo_exp.rollout.sampler import PolicySampler

    run = read_run(run_dir)
    model, tok = load_hub(ModelConfig(name="run", source="hub", path=str(run_dir / "checkpoint"), dtype=run["dtype"]))
    bench = BENCHMARKS.build(run["benchmark"])
    rows = bench.load("test")[: run["rows"]]
    engine = HFRolloutEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             cfg=EngineConfig(**{k: v for k, v in run["engine"].items()
                                                 if k in asdict(EngineConfig())}),
                             default_max_new_tokens=bench.cfg.max_new_tokens)
    sampler = PolicySampler(engine, tok, bench, bench.cfg.steps, chat_template=run["chat_template"])
    before = torch.get_num_threads()
    torch.set_num_threads(run["cpu_threads"] or before)
    try:
        t0 = time.perf_counter()
        res = evaluate(sampler, rows, run["samples"], greedy=run["protocol"] == "greedy")
        return time.perf_counter() - t0, res
    finally:
        torch.set_num_threads(before)


def time_eval(run_dir: Path, **overrides: object) -> tuple[float, dict[str, float]]:
    from gpo_exp.eval import evaluate_model

    result = evaluate_model({"checkpoint": str(run_dir / "checkpoint"), "logger": {"wandb": False}, **overrides})
    label = next(iter(result["benchmarks"]))
    return result["seconds"][label], result["benchmarks"][label]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished gpo_exp.run directory (with checkpoint/ and .hydra/)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timings of each method (median reported)")
    ap.add_argument("--old", action="store_true", help="also time the old defaults (slow on a busy CPU: 5x the generation)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if rundir.saved_config(args.run_dir) is None or not (args.run_dir / "checkpoint").is_dir():
        raise SystemExit(f"{args.run_dir}: not a finished run directory (needs .hydra/config.yaml and checkpoint/)")
    from gpo_exp.eval import read_run
    from gpo_exp.models.checks import cpu_threads
    from gpo_exp.rollout.evaluate import headline_metric

    run = read_run(args.run_dir)
    metric = headline_metric(run["protocol"])
    # The benchmark the old README example needed to name to get the run's number (its config is the run's).
    old = {"benchmarks": ["b"], "bench": {"b": run["benchmark"]}, "samples": 4, "protocol": "greedy",
           "cpu_threads": cpu_threads(), "max_rows": run["rows"]}
    methods = [("in-run", lambda: time_in_run(args.run_dir)), ("eval", lambda: time_eval(args.run_dir))]
    if args.old:
        methods.append(("eval-old", lambda: time_eval(args.run_dir, **old)))
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    values: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in methods:
            s, res = fn()
            times[name].append(s)
            values[name] = res[metric]
    reported = run["reported"].get(f"eval/{metric}_after")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"run {args.run_dir}: {run['rows'] or 'all'} test rows, protocol {run['protocol']}, "
          f"samples {run['samples']}, {cpu_threads()} CPUs")
    print(f"| method | {metric} | seconds (median of {args.repeats}) | / in-run |")
    print("|---|---|---|---|")
    for k in times:
        print(f"| {k} | {values[k]:.4f} | {med[k]:.2f} | {med[k] / med['in-run']:.2f}x |")
    print(f"run's reported eval/{metric}_after: {reported}; eval equals it: {values['eval'] == reported}")
    print(json.dumps({"seconds": times, "values": values, "reported": reported}))


if __name__ == "__main__":
    main()
