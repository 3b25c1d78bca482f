"""Does a base optimizer improve the warm start at all? One offline pass, no GPO loop.

    python -m gpo_exp.bench.offline_pairs [--objectives dpo,ipo,kto,orpo,sft] [--lrs 1e-5,1e-4]
                                          [--steps 40] [--batch 32] [--prompts 512] [--lora 0] [--n-embd 128] [--set beta=1.0]
                                          [--mask completion|divergence_step|divergence_token] [--temperature 1.0]
                                          [--anchor sampled|greedy]

Samples 4 trajectories for each of `--prompts` training prompts with the warm-started policy,
builds whole-trajectory examples (the baseline arm's data) once, then for every (objective, lr)
trains a fresh copy of the warm start for `--steps` steps of `--batch` examples and prints greedy
and sampled test accuracy before and after, and how the log-probability of the sampled correct and
incorrect trajectories moved (mean over trajectories, summed over completion tokens). `sft` is a
control: supervised steps on the benchmark's ground-truth solutions at the same lr and batch, i.e.
what a signal known to be useful does. `--mask` narrows a pairwise loss to where chosen and rejected
first differ: that token's whole step (line), or the token alone; it tests whether the loss is
harmed by training on the tokens after the divergence. `--anchor greedy` builds the examples from
what greedy evaluation gets wrong instead: each prompt's greedy solution, and where it fails, samples
from the prefix before its least confident step, greedy's own continuation being one more rejected.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import time
from typing import Any

import torch

from gpo_exp.bench import parse_key_value
from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.lora import policy_and_reference
from gpo_exp.models.prompting import encode_prompt
from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
from gpo_exp.rollout.evaluate import evaluate
from gpo_exp.rollout.estimators import ESTIMATORS, agreement
from gpo_exp.rollout.gpo_round import GPOConfig, prompt_groups, reset_groups
from gpo_exp.rollout.sampler import PolicySampler
from gpo_exp.rollout.types import Group, Trajectory
from gpo_exp.training.batching import pad_sequences, score_sequences, sequence_logps
from gpo_exp.training.module import adamw
from gpo_exp.training.objectives import OPTIMIZERS
from gpo_exp.training.warmstart import WarmStartConfig, warm_start


def _sampler(model, tok, bench, seed: int = 0, temperature: float = 1.0) -> PolicySampler:
    engine = HFRolloutEngine(model.eval(), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             cfg=EngineConfig(temperature=temperature),
                             default_max_new_tokens=bench.cfg.max_new_tokens)
    return PolicySampler(engine, tok, bench, bench.cfg.steps, seed=seed)


def _accuracy(model, tok, bench, rows) -> tuple[float, float]:
    out = evaluate(_sampler(model, tok, bench), rows, samples=4)
    return out["accuracy"], out["sampled_accuracy"]


MASKS = ("completion", "divergence_step", "divergence_token")
ANCHORS = ("sampled", "greedy")


def sampled_groups(base, tok, bench, rows, seed: int, temperature: float) -> tuple[list[Trajectory], list[Group]]:
    """4 samples per prompt, one group of whole trajectories per prompt (the baseline arm's data)."""
    trajs = _sampler(base, tok, bench, seed, temperature).trajectories(rows, 4)
    return trajs, prompt_groups(trajs)


def greedy_groups(base, tok, bench, rows, seed: int, temperature: float, m: int = 8) -> tuple[list[Trajectory], list[Group]]:
    """Pairs aimed at what greedy evaluation gets wrong: each prompt's greedy solution; where it fails,
    m samples from the prefix before its least confident step, with greedy's own continuation as one
    more (incorrect) candidate (the GPO arm's reset, with the confidence estimator)."""
    trajs = _sampler(base, tok, bench, seed, 0.0).trajectories(rows, 1)
    failed = [t for t in trajs if t.reward == 0]
    sampler = _sampler(base, tok, bench, seed, temperature)
    locs = ESTIMATORS.build({"name": "confidence"}).locate(failed, sampler, seed)
    agree = agreement(locs, failed)
    print(f"greedy anchor: {len(failed)} of {len(trajs)} greedy solutions fail; their least confident step is the "
          f"first wrong one {agree['hits']} / {agree['n']} times", flush=True)
    return trajs, reset_groups(failed, locs, sampler, GPOConfig(reset_samples=m, reuse_estimation=False))


def mask_divergence(example: dict[str, Any], newline_id: int, whole_step: bool) -> None:
    """Restrict a pair's loss to the first differing token (and, with whole_step, the rest of its line)."""
    c, r, start = example["chosen"], example["rejected"], example["start"]
    d = start
    while d < min(len(c), len(r)) and c[d] == r[d]:
        d += 1
    if not whole_step:
        example["start"], example["chosen_end"], example["rejected_end"] = d, d + 1, d + 1
        return
    line = d
    while line > start and c[line - 1] != newline_id:  # back to the start of the step holding token d
        line -= 1

    def end_of_step(ids: list[int]) -> int:
        e = d
        while e < len(ids) and ids[e] != newline_id:
            e += 1
        return e + 1  # the newline belongs to the step
    example["start"], example["chosen_end"], example["rejected_end"] = line, end_of_step(c), end_of_step(r)


def _train(name: str, base, tok, bench, groups: list[Group], gt: list[tuple[list[int], list[int]]], lr: float,
           steps: int, batch: int, lora: int, seed: int, overrides: dict[str, Any], mask: str = "completion") -> Any:
    policy, ref = policy_and_reference(copy.deepcopy(base), lora, 2.0 * lora)
    rng = random.Random(seed)
    opt = adamw([p for p in policy.parameters() if p.requires_grad], lr)  # the run's optimizer
    if name != "sft":
        fields = {f.name for f in dataclasses.fields(OPTIMIZERS.config({"name": name}))}
        extra = {k: v for k, v in overrides.items() if k in fields}
        obj = OPTIMIZERS.build({"name": name, "batch_size": batch, **extra})  # its lr is unused: AdamW is built here
        examples = obj.make_examples(groups, 10**9, random.Random(seed), 2)
        if mask != "completion":
            newline_id = tok("\n", add_special_tokens=False).input_ids[-1]
            for e in examples:
                mask_divergence(e, newline_id, whole_step=mask == "divergence_step")
        obj.precompute(examples, policy, ref, tok.pad_token_id)
    for _ in range(steps):
        policy.train()
        if name == "sft":
            b = rng.sample(gt, batch)
            logps, n = sequence_logps(policy, pad_sequences([p + s for p, s in b], [len(p) for p, _ in b],
                                                            tok.pad_token_id))
            loss = -logps.sum() / n.sum()
        else:
            loss, _ = obj.loss(policy, obj.collate(rng.sample(examples, min(batch, len(examples))),
                                                   tok.pad_token_id), ref)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
    return policy.merge_and_unload() if lora else policy


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", default="dpo,ipo,kto,orpo,sft", help="comma list: optimizer names or sft")
    ap.add_argument("--lrs", default="1e-5,1e-4", help="comma list of AdamW learning rates")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per (objective, lr)")
    ap.add_argument("--batch", type=int, default=32, help="examples (pairs for pairwise losses) per step")
    ap.add_argument("--prompts", type=int, default=512, help="training prompts sampled 4 times each")
    ap.add_argument("--test-rows", type=int, default=300, help="test rows evaluated")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--n-embd", type=int, default=ModelConfig.n_embd, help="tiny model width (its warm start is trained if not cached)")
    ap.add_argument("--n-head", type=int, default=ModelConfig.n_head, help="tiny model attention heads")
    ap.add_argument("--warm-steps", type=int, default=WarmStartConfig.steps,
                    help="SFT steps of the warm start (fewer: a weaker start with more room to improve)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="optimizer config override for every objective that has the field, e.g. --set beta=1.0")
    ap.add_argument("--mask", default="completion", choices=MASKS,
                    help="pairwise losses only: train on the whole completion, or only where chosen and rejected first differ")
    ap.add_argument("--anchor", default="sampled", choices=ANCHORS,
                    help="sampled: 4 samples per prompt, whole trajectories; greedy: reset greedy's failures at their "
                         "least confident step (8 samples there; greedy's continuation is one more rejected)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature of the training trajectories (evaluation samples stay at 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if "ppo" in args.objectives.split(","):
        raise SystemExit("--objectives: ppo is not supported offline (it needs on-policy rollouts for its value "
                         "head and GAE); allowed: dpo, ipo, kto, simpo, orpo, grpo, sft")
    overrides = dict(parse_key_value(kv, "--set") for kv in args.set)
    unpaired = [o for o in args.objectives.split(",") if o in ("kto", "grpo", "sft")]
    if args.mask != "completion" and unpaired:
        raise SystemExit(f"--mask {args.mask}: needs pairwise objectives, got {','.join(unpaired)}; "
                         "allowed: dpo, ipo, simpo, orpo")
    bench = get("arith")
    base, tok, _ = warm_start(ModelConfig(n_embd=args.n_embd, n_head=args.n_head), bench, WarmStartConfig(steps=args.warm_steps))
    test = bench.load("test")[: args.test_rows]
    train_rows = bench.load("train")
    before = _accuracy(base, tok, bench, test)
    if args.temperature <= 0:
        raise SystemExit(f"--temperature {args.temperature}: must be > 0 (training pairs need sampled trajectories)")
    build = greedy_groups if args.anchor == "greedy" else sampled_groups
    trajs, groups = build(base, tok, bench, train_rows[: args.prompts], args.seed + 1, args.temperature)
    gt = [(encode_prompt(tok, bench.prompt(r), True), tok(r["solution"], add_special_tokens=False).input_ids
           + [tok.eos_token_id]) for r in train_rows[: 5000]]
    print(f"warm start: greedy {before[0]:.3f}, sampled {before[1]:.3f} on {len(test)} test rows; mask {args.mask}; "
          f"{args.anchor} anchor, training samples at temperature {args.temperature:g}: {len(groups)} groups, "
          f"{len(trajs)} trajectories, train accuracy {sum(t.reward for t in trajs) / len(trajs):.3f}", flush=True)
    rows = []
    # log-prob shift of the sampled training trajectories themselves (summed over completion tokens):
    # with likelihood displacement both correct and incorrect ones fall, the mass going elsewhere
    seqs = [t.prompt_ids + list(t.completion_ids) for t in trajs]
    starts = [len(t.prompt_ids) for t in trajs]
    base_logps = score_sequences(base, seqs, starts, tok.pad_token_id)
    n_ok = sum(t.reward > 0 for t in trajs)
    print("| objective | lr | greedy after | sampled after | Δ log p correct | Δ log p incorrect | seconds |\n"
          "|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in args.objectives.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            t0 = time.perf_counter()
            trained = _train(name, base, tok, bench, groups, gt, lr, args.steps, args.batch, args.lora, args.seed,
                             overrides, args.mask)
            greedy, sampled = _accuracy(trained, tok, bench, test)
            shift = [a - b for a, b in zip(score_sequences(trained.eval(), seqs, starts, tok.pad_token_id), base_logps)]
            d_ok = sum(d for d, t in zip(shift, trajs) if t.reward > 0) / max(1, n_ok)
            d_bad = sum(d for d, t in zip(shift, trajs) if t.reward <= 0) / max(1, len(trajs) - n_ok)
            rows.append({"objective": name, "lr": lr, "greedy": greedy, "sampled": sampled,
                         "greedy_before": before[0], "sampled_before": before[1],
                         "dlogp_correct": d_ok, "dlogp_incorrect": d_bad})
            print(f"| {name} | {lr:g} | {greedy:.3f} ({greedy - before[0]:+.3f}) | {sampled:.3f} "
                  f"({sampled - before[1]:+.3f}) | {d_ok:+.2f} | {d_bad:+.2f} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
