"""The real-model GPU check in one command: a few GPO-DPO rounds of SmolLM2-135M (LoRA, bf16 autocast,
gradient checkpointing, micro-batches) on chat-formatted arithmetic, then the memory bench on a
1.5B-shaped random model. Prints tokens/s, peak GPU memory and time per round.

    python -m gpo_exp.bench.gpu_round                       # on a GPU machine (about 5-8 minutes)
    python -m gpo_exp.bench.gpu_round --device cpu --smoke  # the same plumbing on a CPU, tiny sizes

No network is needed once SmolLM2's GGUF has been converted (`model=smollm2_135m` caches it under
$GPO_EXP_CACHE); copy that cache directory to an offline GPU machine with the repository.
Not yet run on hardware by this project.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_rounds(out: Path, device: str, rounds: int, smoke: bool) -> dict:
    """`gpo_exp.run experiment=smollm2_arith` on `device`; returns its summary.json."""
    gpu = device != "cpu"
    args = [sys.executable, "-m", "gpo_exp.run", "experiment=smollm2_arith", f"trainer.rounds={rounds}",
            f"trainer.accelerator={'gpu' if gpu else 'cpu'}", f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
            "logger.wandb=false", "trainer.progress_bar=false", f"hydra.run.dir={out}"]
    if smoke:
        args += ["trainer.fast_dev_run=true", "warm_start.steps=2"]
    subprocess.run(args, check=True)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cpu")
    ap.add_argument("--rounds", type=int, default=3, help="GPO rounds of the SmolLM2 run")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the plumbing, not the speed")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpo_gpu_round_"))
    s = run_rounds(out / "smollm2_arith", args.device, args.rounds, args.smoke)
    n = max(1, int(s["rounds"]))
    gen_tps = s["rollout/generated_tokens"] / max(s["time/rollout_s"], 1e-9)
    print(f"SmolLM2-135M GPO-DPO, {n} rounds on {args.device}: greedy {s['eval/accuracy_before']:.3f} -> "
          f"{s['eval/accuracy_after']:.3f}; {s['rollout/generated_tokens']:.0f} tokens generated at "
          f"{gen_tps:.0f} tok/s (rollout incl. scoring); per round: rollout {s['time/rollout_s'] / n:.1f} s, "
          f"train {s['time/train_s'] / n:.1f} s, eval {s['time/eval_s'] / (n + 1):.1f} s; "
          f"peak GPU memory {s.get('gpu/peak_memory_gb', float('nan')):.2f} GB; total {s['time/total_s']:.0f} s")
    bench = [sys.executable, "-m", "gpo_exp.bench.memory", "--device", args.device, "--vocab", "151936"]
    bench += (["--lengths", "128", "256", "--hidden", "64"] if args.smoke else
              ["--lengths", "512", "1024", "2048", "4096", "--shape", "qwen2-1.5b", "--bf16", "--max-old-gb", "40"])
    subprocess.run(bench, check=True)


if __name__ == "__main__":
    main()
