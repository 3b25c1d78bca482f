"""DPO training throughput with reference log-probs precomputed once vs recomputed in every step.

    python -m gpo_exp.bench.ref_logps [--pairs 256] [--batch 16] [--epochs 1] [--n-layer 4 --n-embd 128] [--lora R]

Both arms train the same policy copy on the same pairs (arith worked solutions as chosen, a corrupted
final answer as rejected). "precomputed" pays for one batched reference pass when the round's data is
built, then trains; "recomputed" runs the reference forward in every step. Prints pairs/s of the
training steps alone and end to end (the precompute pass included), and both ratios, from one run.
With --lora R the policy trains rank-R adapters and the reference is the base with adapters off.
Sizes other than the default use a randomly initialised model (throughput does not depend on it).
"""
from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.lora import policy_and_reference
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


def _train(objective, policy, ref, examples, pad_id: int, batch: int, epochs: int) -> tuple[float, float]:
    """(seconds of the reference precompute pass, seconds of the training steps)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    t0 = time.perf_counter()
    objective.precompute(examples, policy, ref, pad_id)  # a no-op when precompute_ref is false
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.train()
    for _ in range(epochs):
        for i in range(0, len(examples), batch):
            loss, _ = objective.loss(policy, objective.collate(examples[i: i + batch], pad_id), ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return t_pre, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs (the reference is fixed)")
    ap.add_argument("--n-layer", type=int, default=ModelConfig.n_layer, help="tiny model depth")
    ap.add_argument("--n-embd", type=int, default=ModelConfig.n_embd, help="tiny model width")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    bench = get("arith")
    model_cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(1, args.n_embd // 32))
    default = (args.n_layer, args.n_embd) == (ModelConfig.n_layer, ModelConfig.n_embd)
    base, tok, _ = warm_start(model_cfg, bench, WarmStartConfig(enabled=default))
    groups = _groups(tok, bench.load("train")[: args.pairs])
    steps, total = {}, {}
    for precompute in (True, False, True, False):  # alternate, keep the second measurement of each
        policy, ref = policy_and_reference(copy.deepcopy(base), args.lora, 2.0 * args.lora)
        obj = OPTIMIZERS.build({"name": "dpo", "precompute_ref": precompute, "batch_size": args.batch})
        examples = obj.make_examples(groups, args.pairs, random.Random(0))
        t_pre, t_steps = _train(obj, policy, ref, examples, tok.pad_token_id, args.batch, args.epochs)
        arm = "precomputed" if precompute else "recomputed"
        steps[arm] = len(examples) * args.epochs / t_steps
        total[arm] = len(examples) * args.epochs / (t_pre + t_steps)
    params = sum(p.numel() for p in base.parameters())
    print(f"| reference log-probs | pairs/s, training steps | pairs/s, incl. precompute pass |\n|---|---|---|\n"
          f"| precomputed once | {steps['precomputed']:.1f} | {total['precomputed']:.1f} |\n"
          f"| recomputed every step | {steps['recomputed']:.1f} | {total['recomputed']:.1f} |\n\n"
          f"ratio {steps['precomputed'] / steps['recomputed']:.2f}x per training step, "
          f"{total['precomputed'] / total['recomputed']:.2f}x end to end "
          f"({params / 1e6:.1f}M-parameter model, {'LoRA r=' + str(args.lora) if args.lora else 'full fine-tuning'}, "
          f"{args.pairs} pairs, batch {args.batch}, {args.epochs} epoch(s), {torch.get_num_threads()} threads)")
    return {"step_ratio": steps["precomputed"] / steps["recomputed"],
            "total_ratio": total["precomputed"] / total["recomputed"], **{f"steps/{k}": v for k, v in steps.items()}}


if __name__ == "__main__":
    main()
