"""DPO training throughput with reference log-probs precomputed once vs recomputed in every step.

    python -m gpo_exp.bench.ref_logps [--pairs 256] [--batch 16] [--epochs 1] [--model tiny|smollm2_135m]

Both arms train the same policy copy on the same pairs (arith worked solutions as chosen, a corrupted
final answer as rejected). "precomputed" pays for one batched reference pass when the round's data is
built (included in its time) and then trains; "recomputed" runs the reference forward in every step.
Prints pairs/s for each and the ratio, measured in one run.
"""
from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.rollout.types import Continuation, Group
from gpo_exp.training.objectives import OPTIMIZERS
from gpo_exp.training.warmstart import WarmStartConfig, warm_start


def _groups(tok, rows) -> list[Group]:
    out = []
    for r in rows:
        wrong = r["solution"].rsplit(" ", 1)[0] + f" {int(r['answer']) + 1}"
        enc = lambda s: tok(s, add_special_tokens=False).input_ids + [tok.eos_token_id]  # noqa: E731
        out.append(Group(prompt_ids=tok(r["prompt"] + "\n", add_special_tokens=False).input_ids, prefix_ids=[],
                         continuations=[Continuation(enc(r["solution"]), 1.0), Continuation(enc(wrong), 0.0)]))
    return out


def _train(objective, policy, ref, examples, pad_id: int, batch: int, epochs: int) -> float:
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    t0 = time.perf_counter()
    objective.precompute(examples, policy, ref, pad_id)  # a no-op when precompute_ref is false
    policy.train()
    for _ in range(epochs):
        for i in range(0, len(examples), batch):
            loss, _ = objective.loss(policy, objective.collate(examples[i: i + batch], pad_id), ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs (the reference is fixed)")
    args = ap.parse_args(argv)

    bench = get("arith")
    policy, tok, _ = warm_start(ModelConfig(), bench, WarmStartConfig())
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    groups = _groups(tok, bench.load("train")[: args.pairs])
    out = {}
    for precompute in (True, False, True, False):  # alternate, keep the second measurement of each
        obj = OPTIMIZERS.build({"name": "dpo", "precompute_ref": precompute, "batch_size": args.batch})
        examples = obj.make_examples(groups, args.pairs, random.Random(0))
        secs = _train(obj, copy.deepcopy(policy), ref, examples, tok.pad_token_id, args.batch, args.epochs)
        out["precomputed" if precompute else "recomputed"] = len(examples) * args.epochs / secs
    ratio = out["precomputed"] / out["recomputed"]
    print(f"| reference log-probs | pairs/s |\n|---|---|\n| precomputed once | {out['precomputed']:.1f} |\n"
          f"| recomputed every step | {out['recomputed']:.1f} |\n\nratio {ratio:.2f}x "
          f"({args.pairs} pairs, batch {args.batch}, {args.epochs} epoch(s), {torch.get_num_threads()} threads)")
    return {**out, "ratio": ratio}


if __name__ == "__main__":
    main()
