"""DPO training throughput with reference log-probs precomputed once vs recomputed in every step.

    python -m gpo_exp.bench.ref_logps [--pairs 256] [--batch 16] [--epochs 1] [--n-layer 4 --n-embd 128] [--lora R]
    python -m gpo_exp.bench.ref_logps --hf-config HuggingFaceTB/SmolLM2-1.7B-Instruct --device cuda --bf16

Both arms train the same policy copy on the same pairs (arith worked solutions as chosen, a corrupted
final answer as rejected). "precomputed" pays for one batched reference pass when the round's data is
built, then trains; "recomputed" runs the reference forward in every step. Prints pairs/s of the
training steps alone and end to end (the precompute pass included), and both ratios, from one run.
With --lora R the policy trains rank-R adapters and the reference is the base with adapters off.
Sizes other than the default use a randomly initialised model (throughput does not depend on it);
--hf-config takes any HF model's shape and tokenizer (a hub id or a local directory; weights are not
loaded), so a GPU measurement needs no checkpoint download.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import random
import time
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from gpo_exp.bench import device_label, parse_device
from gpo_exp.benchmarks import get
from gpo_exp.models.config import ModelConfig
from gpo_exp.models.lora import policy_and_reference
from gpo_exp.rollout.types import Continuation, Group
from gpo_exp.training.module import adamw
from gpo_exp.training.objectives import OPTIMIZERS, Objective
from gpo_exp.training.warmstart import WarmStartConfig, warm_start


def _groups(tok: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[Group]:
    """One pair per row: the worked solution (chosen) and the same with a wrong final answer (rejected)."""
    out = []
    for r in rows:
        wrong = r["solution"].rsplit(" ", 1)[0] + f" {int(r['answer']) + 1}"
        enc = lambda s: tok(s, add_special_tokens=False).input_ids + [tok.eos_token_id]  # noqa: E731
        out.append(Group(prompt_ids=tok(r["prompt"] + "\n", add_special_tokens=False).input_ids, prefix_ids=[],
                         continuations=[Continuation(enc(r["solution"]), 1.0), Continuation(enc(wrong), 0.0)]))
    return out


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time what has finished
    return time.perf_counter()


def _train(objective: Objective, policy: torch.nn.Module, ref: torch.nn.Module | None, examples: list[dict[str, Any]],
           pad_id: int, batch: int, epochs: int, device: torch.device, bf16: bool) -> tuple[float, float]:
    """(seconds of the reference precompute pass, seconds of the training steps)."""
    opt = adamw([p for p in policy.parameters() if p.requires_grad], lr=1e-6)  # the run's optimizer
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    t0 = _clock(device)
    with autocast:
        objective.precompute(examples, policy, ref, pad_id)  # a no-op when precompute_ref is false
    t_pre = _clock(device) - t0
    t0 = _clock(device)
    policy.train()
    for _ in range(epochs):
        for i in range(0, len(examples), batch):
            with autocast:
                collated = objective.collate(examples[i: i + batch], pad_id)
                loss, _ = objective.loss(policy, {k: v.to(device) for k, v in collated.items()}, ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return t_pre, _clock(device) - t0


def _hf_shape(name: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised model of an HF model's shape, with its tokenizer (no weights fetched)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise SystemExit(f"--hf-config: cannot read a config and tokenizer from {name!r} "
                         f"(a hub id or a local HF model directory): {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    with device:  # initialise in place: a 1.7B model takes seconds on a GPU, not a minute on the CPU
        return AutoModelForCausalLM.from_config(config), tok


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs (the reference is fixed)")
    ap.add_argument("--repeats", type=int, default=2, help="measurements of each arm, alternating; the best counts")
    ap.add_argument("--n-layer", type=int, default=ModelConfig.n_layer, help="tiny model depth")
    ap.add_argument("--n-embd", type=int, default=ModelConfig.n_embd, help="tiny model width")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--hf-config", default=None, help="HF model id or directory: its shape and tokenizer, random weights")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights), as trainer.precision=bf16-mixed")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats: {args.repeats} is not allowed; allowed: >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)

    bench = get("arith")
    if args.hf_config:
        base, tok = _hf_shape(args.hf_config, device)
    else:
        model_cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(1, args.n_embd // 32))
        default = (args.n_layer, args.n_embd) == (ModelConfig.n_layer, ModelConfig.n_embd)
        base, tok, _ = warm_start(model_cfg, bench, WarmStartConfig(enabled=default))
    base = base.to(device)
    groups = _groups(tok, bench.load("train")[: args.pairs])
    steps, total = {"precomputed": 0.0, "recomputed": 0.0}, {"precomputed": 0.0, "recomputed": 0.0}
    for precompute in (True, False) * args.repeats:  # alternate arms; best of each, as timeit does
        policy, ref = policy_and_reference(copy.deepcopy(base), args.lora, 2.0 * args.lora)
        obj = OPTIMIZERS.build({"name": "dpo", "precompute_ref": precompute, "batch_size": args.batch})
        examples = obj.make_examples(groups, args.pairs, random.Random(0))
        t_pre, t_steps = _train(obj, policy, ref, examples, tok.pad_token_id, args.batch, args.epochs, device, args.bf16)
        arm = "precomputed" if precompute else "recomputed"
        steps[arm] = max(steps[arm], len(examples) * args.epochs / t_steps)
        total[arm] = max(total[arm], len(examples) * args.epochs / (t_pre + t_steps))
        del policy, ref  # free this arm's copy (and its optimizer state) before the next one is made
        if device.type == "cuda":
            torch.cuda.empty_cache()
    params = sum(p.numel() for p in base.parameters())
    print(f"| reference log-probs | pairs/s, training steps | pairs/s, incl. precompute pass |\n|---|---|---|\n"
          f"| precomputed once | {steps['precomputed']:.1f} | {total['precomputed']:.1f} |\n"
          f"| recomputed every step | {steps['recomputed']:.1f} | {total['recomputed']:.1f} |\n\n"
          f"ratio {steps['precomputed'] / steps['recomputed']:.2f}x per training step, "
          f"{total['precomputed'] / total['recomputed']:.2f}x end to end "
          f"({params / 1e6:.1f}M-parameter model, {'LoRA r=' + str(args.lora) if args.lora else 'full fine-tuning'}, "
          f"{args.pairs} pairs, batch {args.batch}, {args.epochs} epoch(s), best of {args.repeats}, {device_label(device)}, {'bf16 autocast' if args.bf16 else 'fp32'})")
    return {"step_ratio": steps["precomputed"] / steps["recomputed"],
            "total_ratio": total["precomputed"] / total["recomputed"], "params": params,
            **{f"steps/{k}": v for k, v in steps.items()}}


if __name__ == "__main__":
    main()
