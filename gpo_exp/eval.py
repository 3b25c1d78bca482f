"""`python -m gpo_exp.eval [overrides]`: one model, several benchmarks, one table (conf/eval.yaml).

    compose + validate -> load the model once (a checkpoint, a hub/GGUF model, or tiny's warm start)
    -> per benchmark: its prompts, max_new_tokens and steps; greedy pass@1, sampled accuracy, pass@k, maj@k
    -> average over benchmarks -> markdown table, eval.json, wandb (offline by default)

`checkpoint=<run>/checkpoint` alone reproduces the run's own evaluation: the benchmark `run` stands for
the run's benchmark config, and the protocol, samples, rows, engine settings, precision and CPU threads
come from <run>/.hydra/config.yaml unless set here, so the result equals the run's
`eval/accuracy_after` (`summary.json`). Any other benchmark is one override away (`benchmarks=[run,gsm8k]`).
A benchmark that fails is one `error: <label>: ...` line; the others still run, and the command exits 1.

Benchmarks are composed by Hydra under `bench.<label>` from conf/benchmark/*.yaml, so one field is
changed with `bench.arith.seed=1`, and a second copy of a benchmark is added with
`+benchmark@bench.arith_s1=arith bench.arith_s1.seed=1 'benchmarks=[arith,arith_s1]'`.
"""
from __future__ import annotations

import contextlib
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

from gpo_exp.training import rundir
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


RUN = "run"  # the benchmark label that means "the checkpoint's run's own benchmark config"
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")  # Lightning's names (trainer.precision)


@dataclass
class EvalConfig:
    """The root config of an evaluation. `validate` turns `model` and `bench` into dataclasses and fills the
    fields left null from the checkpoint's run (or from the stand-alone defaults)."""

    model: Any = None  # ModelConfig fields; a ModelConfig after validate (checkpoint applied)
    bench: dict[str, Any] = field(default_factory=dict)  # label -> benchmark config; validate keeps the selected ones
    benchmarks: list[str] | None = None  # labels of bench.* to evaluate, in table order; `run` = the checkpoint's run's benchmark. null: [run] for a run's checkpoint, else [arith]
    split: str = "test"  # split evaluated on every benchmark
    max_rows: int | None = None  # first max_rows rows of each benchmark's split (null: all; for `run`: the run's trainer.eval_rows)
    samples: int | None = None  # k for pass@k / maj@k and sampled accuracy (0: greedy pass@1 only); null: the run's trainer.eval_samples, else 4
    protocol: str | None = None  # greedy: headline greedy pass@1 | sampled: no greedy decoding, headline pass@1 averaged over `samples` samples at engine.temperature (reasoning models); null: the run's trainer.eval_protocol, else greedy
    seed: int = EVAL_SEED  # sampling seed; the default is training's evaluation seed
    checkpoint: str | None = None  # shortcut: an HF directory (a run's checkpoint/, or the run directory itself), meaning model.source=hub model.path=<it>
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: str | None = None  # generation precision, Lightning's names: 32-true | bf16-mixed | 16-mixed (autocast); null: the run's trainer.precision, else 32-true
    cpu_threads: int | None = None  # torch CPU threads; null: the run's trainer.cpu_threads, else 1 for the tiny model (or a checkpoint of it: its matrices are too small to split, and extra threads on a busy CPU cost ~6x) and every CPU otherwise
    output_dir: str | None = None  # where eval.json goes (None: Hydra's run directory, or nothing outside Hydra)
    engine: EngineConfig = field(default_factory=EngineConfig)  # generation settings (max_new_tokens: per benchmark); for a run's checkpoint, fields left at their defaults take the run's values
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)  # tiny only: warm start on the first benchmark
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb (offline by default); csv is unused here
    from_run: dict[str, Any] | None = None  # filled by validate: the checkpoint's run (dir, what it evaluated, what it reported)

    def __post_init__(self) -> None:
        check(self.benchmarks is None or (len(self.benchmarks) > 0 and len(set(self.benchmarks)) == len(self.benchmarks)),
              "benchmarks", self.benchmarks, "a non-empty list of distinct labels (or null)")
        check(self.split in SPLITS, "split", self.split, f"one of {', '.join(SPLITS)}")
        check(self.max_rows is None or self.max_rows >= 1, "max_rows", self.max_rows, ">= 1 or null")
        check(self.samples is None or self.samples >= 0, "samples", self.samples, ">= 0 (0: greedy only)")
        check(self.protocol is None or self.protocol in PROTOCOLS, "protocol", self.protocol,
              f"one of {', '.join(PROTOCOLS)}")
        check(self.precision is None or str(self.precision) in PRECISIONS, "precision", self.precision,
              f"one of {', '.join(PRECISIONS)}")
        check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", self.cpu_threads, ">= 1 or null")
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


def locate_checkpoint(checkpoint: str) -> tuple[Path, Path | None]:
    """(the HF directory, the run directory it came from or None). `checkpoint=` may name a run's
    checkpoint/ or the run directory itself; a run directory is one holding gpo_exp.run's .hydra/config.yaml."""
    path = Path(checkpoint)
    if (path / rundir.CONFIG).is_file() and (path / "checkpoint").is_dir():
        return path / "checkpoint", path
    check(path.is_dir(), "checkpoint", checkpoint, "an existing HF directory, e.g. outputs/runs/<run>/checkpoint")
    return path, (path.parent if (path.parent / rundir.CONFIG).is_file() else None)


def read_run(run_dir: Path) -> dict[str, Any]:
    """What the run in `run_dir` evaluated, from its resolved config (as gpo_exp.run validated it, fast_dev_run
    applied): benchmark config, rows, samples, protocol, engine, precision, threads; plus its reported metrics."""
    from gpo_exp.training.run_config import validate as validate_run
    from gpo_exp.run import apply_fast_dev_run

    saved = rundir.saved_config(run_dir)
    try:
        cfg = validate_run(OmegaConf.create(saved))
    except ConfigError as e:
        raise ConfigError(f"the run's config {run_dir / rundir.CONFIG} does not validate with this code ({e}); "
                          "name what to evaluate with benchmarks=[...] (e.g. benchmarks=[arith_testbed])") from None
    if cfg.trainer.fast_dev_run:
        apply_fast_dev_run(cfg)
    reported: dict[str, Any] = {}
    try:
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
        reported = {k: v for k, v in summary.items() if k.startswith("eval/") and k.endswith("_after")
                    and isinstance(v, (int, float)) and "/diag/" not in k}
        reported["status"] = summary.get("status")
    except (OSError, ValueError):
        pass
    return {"dir": str(run_dir), "config": str(run_dir / rundir.CONFIG), "benchmark": asdict(cfg.benchmark),
            "rows": cfg.trainer.eval_rows, "samples": cfg.trainer.eval_samples, "protocol": cfg.trainer.eval_protocol,
            "precision": str(cfg.trainer.precision), "engine": asdict(cfg.engine),
            "cpu_threads": cfg.trainer.cpu_threads or (1 if cfg.model.source == "tiny" else None),
            "chat_template": cfg.model.chat_template, "dtype": cfg.model.dtype, "reported": reported}


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


def _fill_from_run(out: EvalConfig, run: dict[str, Any] | None) -> None:
    """Fields left null take the run's values (a run's checkpoint) or the stand-alone defaults."""
    if out.benchmarks is None:
        if out.checkpoint and run is None:
            raise ConfigError(f"bad config checkpoint={out.checkpoint!r}: no run directory beside it "
                              f"(no ../{rundir.CONFIG}), so the benchmark it was trained on is unknown; "
                              "name what to evaluate with benchmarks=[...] (e.g. benchmarks=[arith_testbed])")
        out.benchmarks = [RUN] if run is not None else ["arith"]
    check(RUN not in out.benchmarks or run is not None, "benchmarks", out.benchmarks,
          f"labels of bench.* ('{RUN}' needs checkpoint=<run dir>/checkpoint of a run whose directory holds "
          f"{rundir.CONFIG})")
    if out.samples is None:
        out.samples = run["samples"] if run is not None else 4
    if out.protocol is None:
        out.protocol = run["protocol"] if run is not None else "greedy"
    if out.precision is None:
        out.precision = run["precision"] if run is not None else "32-true"
    if out.cpu_threads is None and run is not None:
        out.cpu_threads = run["cpu_threads"]
    if run is not None:  # engine fields left at their defaults: the run's (temperature, top-p, length, batching)
        default = EngineConfig()
        for k in ("temperature", "top_p", "max_new_tokens", "batch_size", "sort_by_length", "dedup"):
            if getattr(out.engine, k) == getattr(default, k):
                setattr(out.engine, k, run["engine"][k])
    check(out.protocol != "sampled" or out.samples >= 1, "samples", out.samples, ">= 1 for protocol=sampled")


def validate(cfg: DictConfig | dict[str, Any] | EvalConfig) -> EvalConfig:
    """Validated config: model is a ModelConfig, bench holds the selected benchmarks' config dataclasses,
    every null field is filled (from the checkpoint's run when there is one).

    Raises ConfigError with one line (an unknown benchmark lists the registered names).
    """
    if isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=True)
    elif is_dataclass(cfg):
        raw = asdict(cfg)  # type: ignore[arg-type]
    else:
        raw = dict(cfg)
    model, bench = raw.pop("model", None) or {}, raw.pop("bench", None) or {}  # type: ignore[union-attr]
    raw.pop("from_run", None)
    out: EvalConfig = to_dataclass(EvalConfig, raw, "eval")
    run = None
    if out.checkpoint:
        path, run_dir = locate_checkpoint(out.checkpoint)
        out.checkpoint = str(path)
        model = checkpoint_model(model, out.checkpoint)
        if run_dir is not None:
            run = read_run(run_dir)
            model.update(chat_template=run["chat_template"], dtype=run["dtype"])
    _fill_from_run(out, run)
    out.from_run = run
    out.model = to_dataclass(ModelConfig, model, "model")
    out.bench = {label: BENCHMARKS.config(run["benchmark"] if label == RUN and run is not None
                                          else bench_node(bench, label)) for label in out.benchmarks}
    return out


def bench_source(cfg: EvalConfig, label: str) -> str:
    """Where benchmark `label`'s config came from (logged, so a number can be traced to its settings)."""
    if label == RUN and cfg.from_run is not None:
        return f"the run's benchmark ({cfg.from_run['config']})"
    if (CONF_DIR / "benchmark" / f"{label}.yaml").is_file():
        return f"conf/benchmark/{label}.yaml"
    return f"benchmark {label!r} defaults"


def run_mismatch_note(cfg: EvalConfig, label: str) -> str | None:
    """A note when `label` names the run's benchmark but with other settings (arith vs the run's testbed arith)."""
    run = cfg.from_run
    if run is None or label == RUN or cfg.bench[label].name != run["benchmark"]["name"]:
        return None
    diff = rundir.differing_keys(run["benchmark"], asdict(cfg.bench[label]))
    if not diff:
        return None
    return (f"note: {label} is not the run's benchmark config (differs in {', '.join(diff[:4])}); "
            f"benchmarks=[{RUN}] evaluates on the run's")


def load_model(cfg: EvalConfig) -> tuple[Any, Any, str]:
    """(model, tokenizer, description): tiny is warm-started on the first benchmark; others load as they are."""
    from gpo_exp.models import load_hub
    from gpo_exp.training.warmstart import warm_start

    if cfg.model.source == "random":  # a random-init twin of a hub architecture: offline smoke evaluations
        from gpo_exp.models import build_base

        model, tok = build_base(cfg.model, [])
        return model, tok, f"{cfg.model.name} (random init, {cfg.model.path} architecture)"
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
    names = result.get("names", {})
    for b, m in result["benchmarks"].items():
        cells = [f"{b} ({names[b]})" if b == RUN and b in names else b, str(m["n"]), *(f"{m[k]:.3f}" for k in metrics), f"{result['seconds'][b]:.1f}"]
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


def eval_threads(cfg: EvalConfig) -> int:
    """CPU threads for generation: the config's, else 1 for the tiny model, else every CPU this process may use
    (the run's rule: tiny's matrices are too small to split, and on a busy 2-core CPU two threads made the
    1000-row testbed eval ~6x slower than one)."""
    from gpo_exp.models.checks import cpu_threads

    return cfg.cpu_threads or (1 if cfg.model.source == "tiny" else cpu_threads())


def precision_context(precision: str, device: str) -> Any:
    """What Lightning's trainer.precision does around a forward pass: autocast for the mixed precisions."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def check_context(model: Any, label: str, prompts: list[list[int]], max_new_tokens: int) -> None:
    """ConfigError (one line) when the longest prompt plus max_new_tokens does not fit the model's positions:
    the engine would otherwise cut those generations at the context's end, unfinished, and grade them wrong."""
    from gpo_exp.models.checks import context_length

    limit = context_length(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"needs {longest + max_new_tokens} tokens (longest prompt {longest} + max_new_tokens "
                          f"{max_new_tokens}) but the model's context is {limit}; set bench.{label}.max_new_tokens "
                          f"lower or evaluate a model with a longer context")


def evaluate_model(cfg: DictConfig | dict[str, Any] | EvalConfig) -> dict[str, Any]:
    """Evaluate one model on every benchmark of `cfg`; write eval.json (when there is an output dir), log to wandb.

    Returns {model, split, samples, seed, protocol, headline (the metric key the protocol names),
    benchmarks: {label: {[accuracy,] [sampled_accuracy, pass@k, maj@k,] truncated, n}},
    avg: {metric: mean over benchmarks}, seconds: {load, <label>..., total}, [failed: {label: line}],
    [run: {dir, reported: the run's eval/*_after}]}.
    """
    from gpo_exp.rollout.sampler import PolicySampler

    cfg = validate(cfg)
    config = asdict(cfg)
    out_dir = _output_dir(cfg)
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(eval_threads(cfg))  # before the warm start too: tiny trains it on one thread, like the run
    try:
        torch.manual_seed(cfg.seed)  # only matters for an untrained tiny model (warm_start.enabled=false)
        model, tokenizer, desc = load_model(cfg)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        model = model.to(device).eval()
        seconds = {"load": time.perf_counter() - t_start}
        log.info("model %s on %s | %s split, %s rows per benchmark, protocol %s, k=%d, precision %s, %d CPU threads",
                 desc, device, cfg.split, cfg.max_rows or "all", cfg.protocol, cfg.samples, cfg.precision,
                 torch.get_num_threads())
        run = _wandb_run(cfg, out_dir, config)
        per_bench: dict[str, dict[str, float]] = {}
        failed: dict[str, str] = {}  # a benchmark that cannot run is reported; the others' results are kept
        ci95: dict[str, dict[str, float | None]] = {}  # label -> metric -> 95% CI half-width over rows
        by_group: dict[str, dict[str, dict[str, float]]] = {}  # label -> group (subject, category, task) -> metrics
        for label in cfg.benchmarks:  # type: ignore[union-attr]
            t0 = time.perf_counter()
            log.info("%s: config from %s", label, bench_source(cfg, label))
            if note := run_mismatch_note(cfg, label):
                log.info("%s", note)
            try:
                benchmark = BENCHMARKS.build(asdict(cfg.bench[label]))
                limit = cfg.max_rows if cfg.max_rows is not None or label != RUN else cfg.from_run["rows"]  # type: ignore[index]
                rows = benchmark.load(cfg.split)[:limit]  # malformed rows are already skipped by load
                check_fits(cfg.model, benchmark, rows)
                engine = HFRolloutEngine(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                         cfg=cfg.engine, default_max_new_tokens=benchmark.cfg.max_new_tokens)
                sampler = PolicySampler(engine, tokenizer, benchmark, benchmark.cfg.steps,
                                        chat_template=cfg.model.chat_template, seed=cfg.seed)
                check_context(model, label, [sampler.encode(r) for r in rows],
                              cfg.engine.max_new_tokens or benchmark.cfg.max_new_tokens)
                per_row: list[dict[str, float]] = []
                with precision_context(cfg.precision, device):  # type: ignore[arg-type]
                    metrics = evaluate(sampler, rows, cfg.samples, seed=cfg.seed,  # type: ignore[arg-type]
                                       greedy=cfg.protocol == "greedy", per_row=per_row)
                per_bench[label] = {**metrics, "n": len(rows)}
                ci95[label] = {k: half_width([r[k] for r in per_row]) for k in per_row[0]} if per_row else {}
                if groups := breakdown(benchmark, rows, per_row):
                    by_group[label] = groups
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
    finally:
        torch.set_num_threads(threads_before)
    seconds["total"] = time.perf_counter() - t_start
    result = {"model": desc, "split": cfg.split, "samples": cfg.samples, "seed": cfg.seed,
              "protocol": cfg.protocol, "headline": headline_metric(cfg.protocol), "benchmarks": per_bench,  # type: ignore[arg-type]
              "avg": average(per_bench) if per_bench else {}, "seconds": seconds, **({"failed": failed} if failed else {})}
    result["ci95"] = ci95
    if by_group:
        result["breakdown"] = by_group
    if cfg.from_run is not None:
        result["run"] = {"dir": cfg.from_run["dir"], "reported": cfg.from_run["reported"]}
    result["names"] = {label: cfg.bench[label].name for label in cfg.benchmarks}  # type: ignore[union-attr]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps({**result, "config": config}, indent=2, default=str))
        if per_bench:
            md, csv_text = paper_table(result)
            (out_dir / "table.md").write_text(md + "\n")
            (out_dir / "table.csv").write_text(csv_text)
    if run is not None:
        flat = flat_metrics(result)
        run.log({k: v for k, v in flat.items() if k.startswith("eval/avg/")})
        run.summary.update(flat)
        run.finish()
    return result


def half_width(values: list[float]) -> float | None:
    """95% confidence half-width of the mean of per-row values (Student t over rows; None for one row)."""
    from gpo_exp.report.stats import summarize

    return summarize(values).ci95 if values else None


def breakdown(benchmark: Any, rows: list[dict[str, Any]], per_row: list[dict[str, float]]
              ) -> dict[str, dict[str, float]]:
    """{group: {n, metric: mean over the group's rows}} for benchmarks whose rows have a group
    (MMLU's subject, MMLU-Pro's category, BBH's task, MATH's subject); {} otherwise."""
    groups: dict[str, list[dict[str, float]]] = {}
    for row, r in zip(rows, per_row):
        g = benchmark.group_of(row)
        if g is not None:
            groups.setdefault(str(g), []).append(r)
    return {g: {"n": len(rs), **{k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}} for g, rs in sorted(groups.items())}


# Column names of the paper's Table 1, by benchmark name (others keep their label).
PAPER_NAMES = {"bbh": "BBH", "math": "MATH", "math500": "MATH", "gsm8k": "GSM8K", "mmlu": "MMLU",
               "mmlu_pro": "MMLU-Pro", "aime24": "AIME24", "aime25": "AIME25"}


def paper_table(result: dict[str, Any]) -> tuple[str, str]:
    """The paper's Table 1 shape (markdown, csv): one row for the model, one column per benchmark and the
    average, cells = the protocol's headline metric in % with its 95% CI half-width over rows. The average's
    half-width treats the benchmarks as independent: sqrt(sum of squared half-widths) / count."""
    metric = result["headline"]
    names = result.get("names", {})
    cols = [(label, PAPER_NAMES.get(names.get(label, label), label)) for label in result["benchmarks"]]
    cells, csv_cells, hws = [], [], []
    for label, _ in cols:
        mean, hw = result["benchmarks"][label][metric], result.get("ci95", {}).get(label, {}).get(metric)
        hws.append(hw)
        cells.append(f"{100 * mean:.1f}" + (f" ± {100 * hw:.1f}" if hw is not None else ""))
        csv_cells += [f"{100 * mean:.2f}", "" if hw is None else f"{100 * hw:.2f}"]
    avg = sum(result["benchmarks"][label][metric] for label, _ in cols) / len(cols)
    avg_hw = (sum(h * h for h in hws) ** 0.5 / len(hws)) if all(h is not None for h in hws) else None
    cells.append(f"{100 * avg:.1f}" + (f" ± {100 * avg_hw:.1f}" if avg_hw is not None else ""))
    csv_cells += [f"{100 * avg:.2f}", "" if avg_hw is None else f"{100 * avg_hw:.2f}"]
    heads = [name for _, name in cols] + ["Avg"]
    model = str(result["model"]).replace("|", "/")
    md = "\n".join([f"{metric} (%), 95% CI over problems; n = "
                     + ", ".join(f"{name} {result['benchmarks'][label]['n']}" for label, name in cols),
                     "", "| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads),
                     f"| {model} | " + " | ".join(cells) + " |"])
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "metric", *[x for h in heads for x in (h, f"{h} ci95")]])
    w.writerow([result["model"], metric, *csv_cells])
    return md, buf.getvalue()


def run_comparison(result: dict[str, Any]) -> str | None:
    """'the run reported eval/accuracy_after 0.665; this evaluation 0.665 (equal)', for the `run` benchmark."""
    run, mine = result.get("run"), result["benchmarks"].get(RUN)
    if not run or mine is None:
        return None
    parts = []
    for key, value in run["reported"].items():
        metric = key.removeprefix("eval/").removesuffix("_after")
        if metric in mine and isinstance(value, (int, float)):
            same = "equal" if mine[metric] == value else f"differs by {mine[metric] - value:+.4g}"
            parts.append(f"{metric} {value:.4g} (run) vs {mine[metric]:.4g} (here): {same}")
    return f"run {run['dir']}: " + "; ".join(parts) if parts else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(dcfg: DictConfig) -> dict[str, Any]:
    """Exit codes: 0 all benchmarks evaluated; 1 some benchmark failed (the others' results are written);
    2 a config error before anything ran."""
    try:
        result = evaluate_model(dcfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{result['model']}, {result['split']} split\n\n{markdown_table(result)}", flush=True)
    if len(result["benchmarks"]) > 1:
        print(f"\n{paper_table(result)[0]}", flush=True)
    if line := run_comparison(result):
        print(f"\n{line}", flush=True)
    out = Path(dcfg.output_dir or HydraConfig.get().runtime.output_dir)
    print(f"\nwritten {out / 'eval.json'}", flush=True)
    if result.get("failed"):
        print(f"error: {len(result['failed'])} of {len(result['failed']) + len(result['benchmarks'])} benchmarks "
              f"failed: {', '.join(result['failed'])}", file=sys.stderr, flush=True)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
