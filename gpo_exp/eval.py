"""`python -m gpo_exp.eval [overrides]`: one model, several benchmarks, one table (conf/eval.yaml).

    compose + validate -> load the model once (a checkpoint, a hub/GGUF model, or tiny's warm start)
    -> per benchmark: its prompts, max_new_tokens and steps; greedy pass@1, sampled accuracy, pass@k, maj@k
    -> average over benchmarks -> markdown table, eval.json, wandb (offline by default)

Benchmarks are composed by Hydra under `bench.<label>` from conf/benchmark/*.yaml, so one field is
changed with `bench.arith.seed=1`, and a second copy of a benchmark is added with
`+benchmark@bench.arith_s1=arith bench.arith_s1.seed=1 'benchmarks=[arith,arith_s1]'`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpo_exp.benchmarks import BENCHMARKS
from gpo_exp.benchmarks.base import SPLITS
from gpo_exp.config import LoggerConfig, WarmStartConfig
from gpo_exp.models.config import ModelConfig
from gpo_exp.registry import ConfigError, check, to_dataclass
from gpo_exp.rollout.engine import EngineConfig, HFRolloutEngine
from gpo_exp.rollout.evaluate import EVAL_SEED, PROTOCOLS, evaluate, headline_metric
from gpo_exp.models.tiny_context import check_fits

log = logging.getLogger("gpo_exp")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class EvalConfig:
    """The root config of an evaluation. `validate` turns `model` and `bench` into dataclasses."""

    model: Any = None  # ModelConfig fields; a ModelConfig after validate (checkpoint applied)
    bench: dict[str, Any] = field(default_factory=dict)  # label -> benchmark config; validate keeps the selected ones
    benchmarks: list[str] = field(default_factory=lambda: ["arith"])  # labels of bench.* to evaluate, in table order
    split: str = "test"  # split evaluated on every benchmark
    max_rows: int | None = None  # first max_rows rows of each benchmark's split (None: all)
    samples: int = 4  # k for pass@k / maj@k and sampled accuracy (0: greedy pass@1 only)
    protocol: str = "greedy"  # greedy: headline greedy pass@1 | sampled: no greedy decoding, headline pass@1 averaged over `samples` samples at engine.temperature (reasoning models)
    seed: int = EVAL_SEED  # sampling seed; the default is training's evaluation seed
    checkpoint: str | None = None  # shortcut: an HF directory, meaning model.source=hub model.path=<it>
    device: str = "auto"  # auto: cuda when available, else cpu
    output_dir: str | None = None  # where eval.json goes (None: Hydra's run directory, or nothing outside Hydra)
    engine: EngineConfig = field(default_factory=EngineConfig)  # generation settings (max_new_tokens: per benchmark)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)  # tiny only: warm start on the first benchmark
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb (offline by default); csv is unused here

    def __post_init__(self) -> None:
        check(len(self.benchmarks) > 0 and len(set(self.benchmarks)) == len(self.benchmarks), "benchmarks",
              self.benchmarks, "a non-empty list of distinct labels")
        check(self.split in SPLITS, "split", self.split, f"one of {', '.join(SPLITS)}")
        check(self.max_rows is None or self.max_rows >= 1, "max_rows", self.max_rows, ">= 1 or null")
        check(self.samples >= 0, "samples", self.samples, ">= 0 (0: greedy only)")
        check(self.protocol in PROTOCOLS, "protocol", self.protocol, f"one of {', '.join(PROTOCOLS)}")
        check(self.protocol != "sampled" or self.samples >= 1, "samples", self.samples, ">= 1 for protocol=sampled")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device", self.device,
              "auto, cpu, cuda[:i] or mps")
        check(self.engine.backend == "hf", "engine.backend", self.engine.backend,
              "hf here (engine.backend=vllm serves gpo_exp.run's rounds only)")


def register_eval_config() -> None:
    """Register the eval schema with Hydra (idempotent)."""
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


register_eval_config()


def checkpoint_model(model: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The model config that `checkpoint=<dir>` stands for: a local HF directory, named after its run.

    chat_template is on: it only applies when the saved tokenizer has a template (tiny's has none).
    """
    path = Path(checkpoint)
    name = path.parent.name if path.name == "checkpoint" else path.name
    return {"name": name or "checkpoint", "source": "hub", "path": str(path), "dtype": model.get("dtype", "float32"),
            "chat_template": True}


def bench_node(bench: dict[str, Any], label: str) -> dict[str, Any]:
    """Benchmark `label`'s raw config: bench.<label>, else conf/benchmark/<label>.yaml, else just the name."""
    if label in bench:
        node = dict(bench[label])
    elif (CONF_DIR / "benchmark" / f"{label}.yaml").is_file():
        node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "benchmark" / f"{label}.yaml"), resolve=True)
    else:
        node = {}
    node.setdefault("name", label)
    return node  # type: ignore[return-value]


def validate(cfg: DictConfig | dict[str, Any] | EvalConfig) -> EvalConfig:
    """Validated config: model is a ModelConfig, bench holds the selected benchmarks' config dataclasses.

    Raises ConfigError with one line (an unknown benchmark lists the registered names).
    """
    if isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=True)
    elif is_dataclass(cfg):
        raw = asdict(cfg)  # type: ignore[arg-type]
    else:
        raw = dict(cfg)
    model, bench = raw.pop("model", None) or {}, raw.pop("bench", None) or {}  # type: ignore[union-attr]
    out: EvalConfig = to_dataclass(EvalConfig, raw, "eval")
    if out.checkpoint:
        check(Path(out.checkpoint).is_dir(), "checkpoint", out.checkpoint,
              "an existing HF directory, e.g. outputs/runs/<run>/checkpoint")
        model = checkpoint_model(model, out.checkpoint)
    out.model = to_dataclass(ModelConfig, model, "model")
    out.bench = {label: BENCHMARKS.config(bench_node(bench, label)) for label in out.benchmarks}
    return out


def load_model(cfg: EvalConfig) -> tuple[Any, Any, str]:
    """(model, tokenizer, description): tiny is warm-started on the first benchmark; others load as they are."""
    from gpo_exp.models import load_hub
    from gpo_exp.training.warmstart import warm_start

    if cfg.model.source != "tiny":
        model, tok = load_hub(cfg.model)
        return model, tok, f"{cfg.model.name} ({cfg.model.source}: {cfg.model.path or cfg.model.package})"
    first = cfg.benchmarks[0]
    bench = BENCHMARKS.build(asdict(cfg.bench[first]))
    check_fits(cfg.model, bench, bench.load("train"))  # the warm start trains on its solutions
    model, tok, info = warm_start(cfg.model, bench, cfg.warm_start)
    return model, tok, f"{cfg.model.name} (warm start on {first}: {info['source']})"


def average(per_bench: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over benchmarks of every metric they all report (n excluded), like the paper's avg column."""
    keys = [k for k in next(iter(per_bench.values())) if k != "n" and all(k in m for m in per_bench.values())]
    return {k: sum(m[k] for m in per_bench.values()) / len(per_bench) for k in keys}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """`eval/<bench>/<metric>` and `eval/avg/<metric>`: the keys logged to wandb."""
    out = {f"eval/{b}/{k}": v for b, m in result["benchmarks"].items() for k, v in m.items()}
    return {**out, **{f"eval/avg/{k}": v for k, v in result["avg"].items()}}


def markdown_table(result: dict[str, Any]) -> str:
    """Benchmarks as rows, metrics as columns, the average last."""
    metrics = list(result["avg"])
    head = ["benchmark", "n", *metrics, "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for b, m in result["benchmarks"].items():
        cells = [b, str(m["n"]), *(f"{m[k]:.3f}" for k in metrics), f"{result['seconds'][b]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for b, msg in result.get("failed", {}).items():
        lines.append(f"| {b} | failed: {msg} |")
    n = sum(m["n"] for m in result["benchmarks"].values())
    cells = ["avg", str(n), *(f"{v:.3f}" for v in result["avg"].values()), f"{result['seconds']['total']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wandb_run(cfg: EvalConfig, out_dir: Path | None, config: dict[str, Any]) -> Any:
    if not cfg.logger.wandb or cfg.logger.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                      name=out_dir.name if out_dir else None, job_type="eval", mode=cfg.logger.mode,
                      tags=["eval", cfg.model.name, *cfg.logger.tags], dir=str(out_dir) if out_dir else None,
                      config=config)


def _output_dir(cfg: EvalConfig) -> Path | None:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def evaluate_model(cfg: DictConfig | dict[str, Any] | EvalConfig) -> dict[str, Any]:
    """Evaluate one model on every benchmark of `cfg`; write eval.json (when there is an output dir), log to wandb.

    Returns {model, split, samples, seed, protocol, headline (the metric key the protocol names),
    benchmarks: {label: {[accuracy,] [sampled_accuracy, pass@k, maj@k,] truncated, n}},
    avg: {metric: mean over benchmarks}, seconds: {load, <label>..., total}}.
    """
    from gpo_exp.rollout.sampler import PolicySampler

    cfg = validate(cfg)
    config = asdict(cfg)
    out_dir = _output_dir(cfg)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # only matters for an untrained tiny model (warm_start.enabled=false)
    model, tokenizer, desc = load_model(cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model = model.to(device).eval()
    seconds = {"load": time.perf_counter() - t_start}
    log.info("model %s on %s | %s split, %s rows per benchmark, k=%d", desc, device, cfg.split,
             cfg.max_rows or "all", cfg.samples)
    run = _wandb_run(cfg, out_dir, config)
    per_bench: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}  # a benchmark that cannot run is reported; the others' results are kept
    for label in cfg.benchmarks:
        t0 = time.perf_counter()
        try:
            benchmark = BENCHMARKS.build(asdict(cfg.bench[label]))
            rows = benchmark.load(cfg.split)[: cfg.max_rows]  # malformed rows are already skipped by load
            check_fits(cfg.model, benchmark, rows)
            engine = HFRolloutEngine(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                     cfg=cfg.engine, default_max_new_tokens=benchmark.cfg.max_new_tokens)
            sampler = PolicySampler(engine, tokenizer, benchmark, benchmark.cfg.steps,
                                    chat_template=cfg.model.chat_template, seed=cfg.seed)
            per_bench[label] = {**evaluate(sampler, rows, cfg.samples, seed=cfg.seed, greedy=cfg.protocol == "greedy"),
                                "n": len(rows)}
        except Exception as e:  # noqa: BLE001 - one benchmark's failure must not lose the others' results
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            failed[label] = msg if isinstance(e, ConfigError) else f"{type(e).__name__}: {msg}"
            print(f"error: {label}: {failed[label]}", file=sys.stderr, flush=True)
            continue
        seconds[label] = time.perf_counter() - t0
        log.info("%s: %s (%d rows, %d tokens, %.1fs)", label,
                 ", ".join(f"{k} {v:.3f}" for k, v in per_bench[label].items() if k != "n"), len(rows),
                 engine.stats.generated_tokens, seconds[label])
        if run is not None:
            run.log({f"eval/{label}/{k}": v for k, v in per_bench[label].items()})
    seconds["total"] = time.perf_counter() - t_start
    result = {"model": desc, "split": cfg.split, "samples": cfg.samples, "seed": cfg.seed,
              "protocol": cfg.protocol, "headline": headline_metric(cfg.protocol), "benchmarks": per_bench,
              "avg": average(per_bench) if per_bench else {}, "seconds": seconds, **({"failed": failed} if failed else {})}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps({**result, "config": config}, indent=2, default=str))
    if run is not None:
        flat = flat_metrics(result)
        run.log({k: v for k, v in flat.items() if k.startswith("eval/avg/")})
        run.summary.update(flat)
        run.finish()
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(dcfg: DictConfig) -> dict[str, Any]:
    try:
        result = evaluate_model(dcfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{result['model']}, {result['split']} split\n\n{markdown_table(result)}", flush=True)
    out = Path(dcfg.output_dir or HydraConfig.get().runtime.output_dir)
    print(f"\nwritten {out / 'eval.json'}", flush=True)
    if result.get("failed") and not result["benchmarks"]:
        sys.exit(2)
    return result


if __name__ == "__main__":
    main()
