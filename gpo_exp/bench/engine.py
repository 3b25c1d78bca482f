"""Rollout throughput: our batched engine vs looping over HF `generate`, on the same model and requests.

    python -m gpo_exp.bench.engine [--requests 64] [--k 4] [--model tiny] [--untrained]

The requests are what a GPO round asks for: arith prompts and random step prefixes of a sampled
solution, K continuations each. Three methods generate them with the same sampling settings
(temperature 1, no top-p/top-k, the benchmark's token budget):

  (a) engine    HFRolloutEngine: deduplicated, length-bucketed batches of `--batch-size`
  (b) hf-k      one `model.generate(do_sample=True, num_return_sequences=K)` call per prefix
  (c) hf-1      one `model.generate(do_sample=True)` call per continuation

Generated tokens count the new tokens up to and including eos. The default model is the
warm-started tiny policy (trained and cached on first use, which takes minutes); `--untrained`
uses a random one, which never stops early, so its lengths are not representative.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.bench import device_label, parse_device
from gpo_exp.benchmarks import Benchmark, get
from gpo_exp.models import ModelConfig, build_base
from gpo_exp.models.prompting import encode_prompt
from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
from gpo_exp.rollout.steps import split_steps


@dataclass
class Result:
    method: str
    requests: int  # continuations generated
    tokens: int  # new tokens, eos included
    finished: int  # continuations that ended with eos
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def load_policy(model: str, untrained: bool, bench: Benchmark, seed: int
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelConfig]:
    """The warm-started tiny policy (cached after the first run), or a random one with `untrained`."""
    cfg = ModelConfig(name=model)
    if untrained:
        torch.manual_seed(seed)
        rows = bench.load("train")[:2000]
        m, tok = build_base(cfg, [bench.prompt(r) + r["solution"] for r in rows])
        return m.eval(), tok, cfg
    from gpo_exp.training.warmstart import WarmStartConfig, warm_start

    m, tok, info = warm_start(cfg, bench, WarmStartConfig())
    print(f"warm start: {info['source']} {info.get('path', '')}")
    return m.eval(), tok, cfg


def make_prefixes(engine: HFRolloutEngine, tok: PreTrainedTokenizerBase, bench: Benchmark, cfg: ModelConfig,
                  n: int, seed: int) -> list[list[int]]:
    """n prefixes: test prompts, each extended by a random number of steps of one sampled solution."""
    rows = bench.load("test")[:n]
    prompts = [encode_prompt(tok, bench.prompt(r), cfg.chat_template) for r in rows]
    gens = engine.generate(prompts, [0] * len(prompts), seed=seed + 1)
    rng = random.Random(seed)
    out = []
    for p, g in zip(prompts, gens):
        ends = split_steps(g.ids, tok, bench.cfg.steps)
        i = rng.randrange(len(ends)) if ends else 0  # 0: the prompt alone; never the finished trajectory
        out.append(p + g.ids[: ([0] + ends)[i]])
    return out


def new_tokens(row: Sequence[int], eos: int) -> tuple[int, bool]:
    """Generated length up to and including the first eos, and whether there was one."""
    row = list(row)
    return (row.index(eos) + 1, True) if eos in row else (len(row), False)


def run_engine(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prefixes: list[list[int]], k: int,
               limit: int, batch_size: int, seed: int) -> Result:
    engine = HFRolloutEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             cfg=EngineConfig(batch_size=batch_size), default_max_new_tokens=limit)
    reqs = [p for p in prefixes for _ in range(k)]
    t0 = time.perf_counter()
    gens = engine.generate(reqs, [j for _ in prefixes for j in range(k)], seed=seed)
    seconds = time.perf_counter() - t0
    return Result("(a) engine", len(reqs), sum(len(g.ids) for g in gens), sum(g.finished for g in gens), seconds)


@torch.no_grad()
def run_hf(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prefixes: list[list[int]], k: int, limit: int,
           per_call: int, seed: int) -> Result:
    """Loop over HF generate, `per_call` continuations per call (k: one call per prefix, 1: per continuation)."""
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=limit,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tokens = finished = 0
    t0 = time.perf_counter()
    for p in prefixes:
        ids = torch.tensor([p], device=model.device)
        for _ in range(k // per_call):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_return_sequences=per_call,
                                 **kw)
            for row in out[:, len(p):].tolist():
                n, done = new_tokens(row, tok.eos_token_id)
                tokens, finished = tokens + n, finished + done
    seconds = time.perf_counter() - t0
    name = f"(b) hf generate x{k}/prefix" if per_call == k else "(c) hf generate x1"
    return Result(name, len(prefixes) * k, tokens, finished, seconds)


def table(results: list[Result]) -> str:
    b, c = results[1].tokens_per_s, results[2].tokens_per_s
    lines = [f"{'method':<28}{'requests':>9}{'tokens':>8}{'finished':>9}{'seconds':>9}{'tokens/s':>10}"
             f"{'vs (b)':>8}{'vs (c)':>8}"]
    for r in results:
        lines.append(f"{r.method:<28}{r.requests:>9}{r.tokens:>8}{r.finished:>9}{r.seconds:>9.2f}"
                     f"{r.tokens_per_s:>10.0f}{r.tokens_per_s / b:>7.1f}x{r.tokens_per_s / c:>7.1f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="distinct prefixes (each gets K continuations)")
    ap.add_argument("--k", type=int, default=4, help="continuations per prefix")
    ap.add_argument("--model", default="tiny", choices=["tiny"], help="policy model preset")
    ap.add_argument("--untrained", action="store_true", help="random tiny model instead of the warm start")
    ap.add_argument("--batch-size", type=int, default=128, help="engine batch size")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (a 128-wide model gains nothing from more; 0: torch default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    bench = get("arith")
    model, tok, cfg = load_policy(args.model, args.untrained, bench, args.seed)
    model = model.to(parse_device(args.device))  # every method reads the token ids back each step, so timings need no sync
    limit = args.max_new_tokens or bench.cfg.max_new_tokens
    prefixes = make_prefixes(HFRolloutEngine(model, tok.eos_token_id, tok.pad_token_id, default_max_new_tokens=limit),
                             tok, bench, cfg, args.requests, args.seed)
    print(f"{len(prefixes)} prefixes x K={args.k}, prefix length {min(map(len, prefixes))}-"
          f"{max(map(len, prefixes))} tokens, max_new_tokens={limit}, {device_label(model.device)}")
    methods: list[Callable[[list[list[int]]], Result]] = [
        lambda ps: run_engine(model, tok, ps, args.k, limit, args.batch_size, args.seed),
        lambda ps: run_hf(model, tok, ps, args.k, limit, args.k, args.seed),
        lambda ps: run_hf(model, tok, ps, args.k, limit, 1, args.seed),
    ]
    for m in methods:  # warm up (first-call allocations, lazy imports) on two prefixes
        m(prefixes[:2])
    results = [m(prefixes) for m in methods]
    print(table(results))
    return results


if __name__ == "__main__":
    main()
