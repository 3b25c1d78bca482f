"""The GPU check in one command: GPO-DPO rounds in bf16 with LoRA on the tiny model and on a random-init
model of Qwen2-1.5B's shape, the log-prob memory bench, and the HF engine's tokens/s. Prepared; not yet
run on hardware.

    python -m gpo_exp.bench.gpu_round                  # on a CUDA GPU: about 6-8 minutes
    python -m gpo_exp.bench.gpu_round --cpu-smoke      # the same steps at tiny sizes on the CPU (minutes)

Steps, each in its own process under its own time limit (one that fails or runs out is reported, the
others still run; the limits add up to 8 minutes on a GPU):
  tiny        `gpo_exp.run`, the default testbed: the tiny model (shipped warm start), LoRA r=8,
              trainer.precision=bf16-mixed, 2 rounds
  qwen2-1.5b  `gpo_exp.run` on a model directory written first: random weights of Qwen2.5-1.5B's shape
              (hidden 1536, 28 layers, 12/2 heads, MLP 8960, vocabulary 151,936, tied embeddings; the shape
              table of models/random_init.py) in bfloat16, and a character tokenizer padded to 151,936 ids.
              LoRA r=16 on every linear layer, gradient checkpointing, bf16-mixed, a 30-step SFT warm start
              on one- and two-operation arithmetic, 2 rounds. Random weights: expect few or no pairs, so
              its rounds measure generation, scoring and evaluation, and the warm start the training steps.
  memory      `gpo_exp.bench.memory` on Qwen2-1.5B's shape in bf16: DPO step and reference pass, old
              log-prob path vs new, T = 1024-4096
  engine      `gpo_exp.bench.engine`: the HF engine's tokens/s on the tiny policy against HF `generate`
Per run it prints tokens/s of the rollout (generation plus scoring), peak GPU memory, seconds per round
(rollout, training, evaluation) and the pairs trained on; everything also goes to <out>/gpu_round.json.

Environment: a GPU image with torch >= 2.11 (CUDA), transformers >= 5.17, peft and pytorch-lightning
installed, and no network. The rest travels as pure-python wheels (under 64 MiB):
    bash gpo_exp/bench/gpu_wheels.sh gpu_wheels             # here, where pip can download
    pip install --no-deps --no-index gpu_wheels/*.whl        # there, offline
then run from the repository root (no install of gpo-exp itself is needed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QWEN_PATH = "Qwen/Qwen2.5-1.5B-Instruct"  # whose shape (models/random_init.py SHAPES) the random model takes
LIMITS_S = {"tiny": 90, "qwen2-1.5b": 210, "memory": 120, "engine": 60}  # GPU: 480 s in all
SMOKE_LIMITS_S = {"tiny": 600, "qwen2-1.5b": 600, "memory": 300, "engine": 300}  # a shared 2-core CPU
COMMON = ["logger.wandb=false", "logger.csv=false", "trainer.progress_bar=false"]


def char_tokenizer_padded(texts: list[str], vocab_size: int) -> Any:
    """The tiny model's character tokenizer over `texts`, padded with unused tokens to `vocab_size` ids,
    so a model with a real LLM's vocabulary (and its output-layer cost) decodes every id it samples."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gpo_exp.models.tiny import SPECIALS

    chars = sorted({c for t in texts for c in t})
    tokens = SPECIALS + chars
    if len(tokens) > vocab_size:
        raise ValueError(f"{len(tokens)} characters do not fit a vocabulary of {vocab_size}")
    vocab = {t: i for i, t in enumerate(tokens + [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def write_qwen2_dir(out: Path, smoke: bool, device: str) -> dict[str, Any]:
    """A local HF directory with a random-init Qwen2 of Qwen2.5-1.5B's shape (smoke: hidden 96, 2 layers,
    the same vocabulary, GQA group and MLP ratio) in bfloat16, and the padded character tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.models.random_init import SHAPES, small_config

    shape = SHAPES[QWEN_PATH]
    bench = BENCHMARKS.build({"name": "arith"})
    tok = char_tokenizer_padded([bench.prompt(r) + r["solution"] for r in bench.load("train")[:2000]]
                                + ["0123456789+-*=,.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz \n"],
                                shape.vocab_size)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if smoke:
        conf = small_config(shape, ModelConfig(source="random", path=QWEN_PATH, n_embd=96, n_layer=2, n_head=6),
                            shape.vocab_size, special)
    else:
        conf = Qwen2Config(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                           num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                           num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size,
                           max_position_embeddings=shape.max_position_embeddings, rope_theta=shape.rope_theta,
                           tie_word_embeddings=shape.tie_word_embeddings, attention_dropout=0.0, **special)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds on a GPU, not a minute of CPU init
        model = Qwen2ForCausalLM(conf).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"params": params, "hidden": conf.hidden_size, "layers": conf.num_hidden_layers,
            "vocab": conf.vocab_size}


def run_args(name: str, out: Path, gpu: bool, smoke: bool, model_dir: Path | None = None) -> list[str]:
    """The `gpo_exp.run` overrides of one GPO-DPO run (tiny, or qwen2-1.5b from `model_dir`)."""
    args = [f"hydra.run.dir={out}", "optimizer=dpo", "gpo.enabled=true", *COMMON,
            f"trainer.accelerator={'gpu' if gpu else 'cpu'}", f"trainer.precision={'bf16-mixed' if gpu else '32-true'}"]
    if name == "tiny":
        args += ["model.lora_r=8", "trainer.rounds=2", "trainer.eval_rows=256"]
    else:
        args += ["model=hf", f"model.path={model_dir}", "model.name=qwen2_1p5b_random", "model.dtype=bfloat16",
                 "model.chat_template=false", "model.lora_r=16", "model.lora_target_modules=all-linear",
                 "model.gradient_checkpointing=true", "benchmark=arith", "benchmark.n_ops=[1,2]", "benchmark.n_mul=0",
                 "benchmark.mul_from=0", "benchmark.max_new_tokens=32", "warm_start.enabled=true",
                 f"warm_start.steps={2 if smoke else 30}", "warm_start.batch_size=16", "warm_start.lr=1e-4",
                 "optimizer.batch_size=8", "optimizer.micro_batch_size=4", "gpo.prompts_per_round=32",
                 "gpo.examples_per_round=32", "trainer.rounds=2", "trainer.eval_rows=64", "trainer.eval_samples=0",
                 "engine.batch_size=128"]
    if smoke:
        args.append("trainer.fast_dev_run=true")
    return args


def run_step(cmd: list[str], limit: int, log: Path) -> tuple[str, float]:
    """Run one step's command, its output to `log` (and its tail to stdout); (status, seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, env=env).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit}s"
    tail = log.read_text().splitlines()[-15:]
    print(f"--- {log.stem}: {status}\n" + "\n".join(tail), flush=True)
    return status, time.perf_counter() - t0


def round_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """tokens/s, peak memory and seconds per round from a run's summary.json."""
    n = max(1, int(summary.get("rounds", 1)))
    rollout = summary["time/rollout_s"]
    return {"rounds": n, "run_status": summary.get("status"),
            "generated_tokens": int(summary["rollout/generated_tokens"]),
            "rollout_tok_s": summary["rollout/generated_tokens"] / max(rollout, 1e-9),
            "rollout_s_per_round": rollout / n, "train_s_per_round": summary["time/train_s"] / n,
            "eval_s_per_round": summary["time/eval_s"] / (n + 1), "warmstart_s": summary.get("time/warmstart_s"),
            "total_s": summary["time/total_s"], "pairs": int(summary.get("gpo/pairs", 0)),
            "examples": int(summary.get("gpo/examples", 0)),
            "accuracy": (summary.get("eval/accuracy_before"), summary.get("eval/accuracy_after")),
            "peak_gpu_memory_gb": summary.get("gpu/peak_memory_gb")}


def fmt_run(name: str, f: dict[str, Any]) -> str:
    peak = f["peak_gpu_memory_gb"]
    return (f"{name} ({f['status']}): {f['rounds']} rounds, {f['generated_tokens']} tokens at {f['rollout_tok_s']:.0f} tok/s "
            f"(rollout incl. scoring); per round: rollout {f['rollout_s_per_round']:.1f} s, train "
            f"{f['train_s_per_round']:.1f} s, eval {f['eval_s_per_round']:.1f} s; warm start {f['warmstart_s'] or 0:.1f} s; "
            f"{f['pairs']} pairs, {f['examples']} examples; greedy {f['accuracy'][0]} -> {f['accuracy'][1]}; "
            f"peak GPU memory {'n/a (CPU)' if peak is None else f'{peak:.2f} GB'}; total {f['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks every step end to end")
    ap.add_argument("--steps", nargs="+", default=list(LIMITS_S), choices=list(LIMITS_S), help="steps to run")
    ap.add_argument("--out", default=None, help="output directory (default: a new temporary one)")
    args = ap.parse_args(argv)
    import torch

    smoke, gpu = args.cpu_smoke, not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_round: no CUDA device is visible here; allowed: a CUDA GPU, or --cpu-smoke on the CPU")
    device = "cuda" if gpu else "cpu"
    limits = SMOKE_LIMITS_S if smoke else LIMITS_S
    out = Path(args.out or tempfile.mkdtemp(prefix="gpo_gpu_round_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    label = torch.cuda.get_device_name(0) if gpu else "CPU (smoke sizes)"
    print(f"gpu_round on {label}: torch {torch.__version__}; output in {out}", flush=True)
    results: dict[str, Any] = {"device": label, "torch": torch.__version__, "smoke": smoke, "steps": {}}
    t_all = time.perf_counter()
    for step in args.steps:
        entry: dict[str, Any] = {}
        if step in ("tiny", "qwen2-1.5b"):
            model_dir = None
            if step == "qwen2-1.5b":
                t0 = time.perf_counter()
                model_dir = out / "qwen2_1p5b_random"
                entry["model"] = write_qwen2_dir(model_dir, smoke, device)
                entry["model"]["write_s"] = time.perf_counter() - t0
                if gpu:
                    torch.cuda.empty_cache()  # the run is another process: leave it the memory
            run_dir = out / f"run_{step}"
            entry["status"], entry["wall_s"] = run_step(py + ["gpo_exp.run", *run_args(step, run_dir, gpu, smoke, model_dir)],
                                                        limits[step], out / f"{step}.log")
            summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
            if "time/rollout_s" in summary:  # also for status no_signal (exit 3): no pairs, the figures still stand
                entry.update(round_figures(summary))
                entry["status"] = entry.pop("run_status")
            elif summary.get("error"):
                entry["error"] = summary["error"]
        elif step == "memory":
            cmd = py + ["gpo_exp.bench.memory", "--device", device, "--vocab", "151936"]
            cmd += (["--lengths", "128", "--hidden", "64", "--ops", "precompute", "--score-seqs", "2"] if smoke else
                    ["--lengths", "1024", "2048", "4096", "--shape", "qwen2-1.5b", "--bf16", "--max-old-gb", "40"])
            entry["status"], entry["wall_s"] = run_step(cmd, limits[step], out / "memory.log")
            entry["table"] = (out / "memory.log").read_text().splitlines()[-12:]
        else:
            cmd = py + ["gpo_exp.bench.engine", "--device", device, "--k", "4", "--requests", "4" if smoke else "16"]
            entry["status"], entry["wall_s"] = run_step(cmd, limits[step], out / "engine.log")
            entry["table"] = (out / "engine.log").read_text().splitlines()[-8:]
        results["steps"][step] = entry
    results["total_s"] = time.perf_counter() - t_all
    (out / "gpu_round.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n=== gpu_round on {label}, {results['total_s']:.0f} s in all")
    for step, e in results["steps"].items():
        if "rollout_tok_s" in e:
            print(fmt_run(step, e))
        else:
            print(f"{step}: {e['status']} ({e['wall_s']:.0f} s){'; ' + e['error'] if e.get('error') else ''}; "
                  f"see {out / (step + '.log')}")
    return results


if __name__ == "__main__":
    main()
