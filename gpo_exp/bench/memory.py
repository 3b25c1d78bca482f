"""Peak memory of the log-prob path against sequence length: the old full-vocabulary path vs the new one.

    python -m gpo_exp.bench.memory [--vocab 151936 49152] [--lengths 512 1024 2048 4096] [--hidden 64]
    python -m gpo_exp.bench.memory --device cuda --shape qwen2-1.5b --bf16   # R1-Distill-Qwen-1.5B's shape

For each (vocabulary, length, path) a random-init Qwen2 of that vocabulary (small hidden size unless
told otherwise, so the logits dominate) runs two operations:
  dpo-step    one DPO optimizer step on one pair (2 sequences), forward + backward
  precompute  the reference pass (`score_sequences`, no gradient) over `--score-seqs` sequences
"old" is the path before this change: the (B, T, V) logits, an fp32 copy, log_softmax, gather.
"new" is `batching.token_logps`: decoder hidden states, the head on completion tokens only, in
checkpointed chunks. Memory is the peak beyond what the process held after building the model
(the weights): on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) in a
forked child per measurement; on a GPU `torch.cuda.max_memory_allocated`. Old-path runs whose
logits alone would exceed --max-old-gb are skipped and say so (they would only swap here).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
from typing import Any, Iterator

import torch

from gpo_exp.bench import device_label, parse_device

PROMPT = 64  # prompt tokens of every sequence; the rest is completion (counted by the losses)
# Real shapes (config.json of Qwen2.5-1.5B / DeepSeek-R1-Distill-Qwen-1.5B), random weights.
SHAPES = {"qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, tie_word_embeddings=True)}


def old_token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor | None = None, value_head: Any = None) -> tuple[torch.Tensor, None]:
    """The previous implementation: full logits in fp32 and a log_softmax copy, then gather."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logps, (1, 0)), None


@contextlib.contextmanager
def logprob_path(path: str) -> Iterator[None]:
    """`batching.token_logps` is the old implementation inside (path "old"), and what it was before
    afterwards, whatever happens inside: a GPU measures in-process, so a later "new" figure must not
    run the old path. `sequence_logps` looks the function up at call time."""
    from gpo_exp.training import batching

    saved = batching.token_logps
    if path == "old":
        batching.token_logps = old_token_logps
    try:
        yield
    finally:
        batching.token_logps = saved


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _model(vocab: int, args: argparse.Namespace, length: int, device: torch.device) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = SHAPES[args.shape] if args.shape else dict(
        hidden_size=args.hidden, intermediate_size=max(4 * args.hidden, 64), num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 2), num_key_value_heads=max(args.hidden // 256, 1),
        tie_word_embeddings=False)
    conf = Qwen2Config(vocab_size=vocab, max_position_embeddings=length + 1, **shape)
    with torch.device(device):  # initialised where it runs: a 1.5B model in a second on a GPU, not a CPU minute
        model = Qwen2ForCausalLM(conf)
    return model.to(torch.bfloat16) if args.bf16 else model


def measure(vocab: int, length: int, path: str, op: str, args: argparse.Namespace) -> float:
    """Peak MB beyond the weights for one (vocabulary, length, path, operation), in this process."""
    with logprob_path(path):
        return _measure(vocab, length, op, args)


def _measure(vocab: int, length: int, op: str, args: argparse.Namespace) -> float:
    from gpo_exp.training import batching
    from gpo_exp.training.objectives import OPTIMIZERS

    device = torch.device(args.device)
    model = _model(vocab, args, length, device)
    ids = torch.randint(0, vocab, (max(2, args.score_seqs), length), generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        base = _rss_kb("VmRSS:") * 1024
    if op == "precompute":
        seqs = ids[: args.score_seqs].tolist()
        batching.score_sequences(model.eval(), seqs, [PROMPT] * len(seqs), 0, batch_size=len(seqs),
                                 max_tokens=len(seqs) * length)
    else:
        dpo = OPTIMIZERS.build({"name": "dpo", "batch_size": 1, "precompute_ref": True})
        ex = [{"chosen": ids[0].tolist(), "rejected": ids[1].tolist(), "start": PROMPT, "ref_logps": (0.0, 0.0)}]
        batch = {k: v.to(device) for k, v in dpo.collate(ex, 0).items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        loss, _ = dpo.loss(model.train(), batch, None)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return (_rss_kb("VmHWM:") * 1024 - base) / 2**20


def _child(q: Any, *a: Any) -> None:
    try:
        q.put(measure(*a))
    except Exception as e:  # reported in the table, not a traceback
        q.put(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}")


def run_one(vocab: int, length: int, path: str, op: str, args: argparse.Namespace) -> float | str:
    if args.device != "cpu":  # a GPU's peak counter resets in-process
        return measure(vocab, length, path, op, args)
    ctx = mp.get_context("fork")  # a fresh address space per measurement, without re-importing torch
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, vocab, length, path, op, args))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[151_936, 49_152], help="vocabulary sizes (Qwen2, SmolLM2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sequence lengths T")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the random-init model")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a real model's shape (overrides --hidden/--layers)")
    ap.add_argument("--score-seqs", type=int, default=4, help="sequences in the reference-precompute batch")
    ap.add_argument("--ops", nargs="+", default=["dpo-step", "precompute"], choices=["dpo-step", "precompute"])
    ap.add_argument("--max-old-gb", type=float, default=2.6, help="skip old-path runs whose fp32 logits exceed this")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    args = ap.parse_args(argv)
    device = parse_device(args.device)
    for v in args.vocab:
        if v < 2 or any(t <= PROMPT + 1 for t in args.lengths):
            raise SystemExit(f"--vocab/--lengths: need vocab >= 2 and lengths > {PROMPT + 1}")
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    shape = args.shape or f"hidden {args.hidden} x {args.layers} layers"
    print(f"peak memory beyond the weights (MB), random-init Qwen2 ({shape}), "
          f"{device_label(device)}; dpo-step: 1 pair (2 seqs), precompute: {args.score_seqs} seqs; "
          f"prompt {PROMPT} tokens")
    print(f"{'op':<11} {'vocab':>7} {'T':>5} {'old':>9} {'new':>8} {'old/new':>8}")
    rows: dict[tuple[str, int, int], float] = {}
    for op in args.ops:
        for v in args.vocab:
            for t in args.lengths:
                seqs = 2 if op == "dpo-step" else args.score_seqs
                gb = seqs * t * v * 4 / 2**30
                old = run_one(v, t, "old", op, args) if gb <= args.max_old_gb else f"skip({gb:.1f}GB)"
                new = run_one(v, t, "new", op, args)
                if isinstance(new, float):
                    rows[(op, v, t)] = new
                ratio = f"{old / new:.1f}x" if isinstance(old, float) and isinstance(new, float) and new > 0 else "-"
                fmt = lambda x: f"{x:.0f}" if isinstance(x, float) else x  # noqa: E731
                print(f"{op:<11} {v:>7} {t:>5} {fmt(old):>9} {fmt(new):>8} {ratio:>8}", flush=True)
    lengths = sorted(args.lengths)
    for op in args.ops:  # asymptotic slope of the new path: MB per 1k tokens between the two longest T
        lo, hi = lengths[-2:] if len(lengths) > 1 else (lengths[0], lengths[0])
        slopes = [f"V={v}: {(rows[(op, v, hi)] - rows[(op, v, lo)]) / max(hi - lo, 1) * 1000:.1f}"
                  for v in args.vocab if (op, v, hi) in rows and (op, v, lo) in rows]
        print(f"new-path slope, {op} (MB per 1k tokens, T {lo}->{hi}): {', '.join(slopes)}")

if __name__ == "__main__":
    main()
