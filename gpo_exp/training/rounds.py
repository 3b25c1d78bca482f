"""The generation callback: each round, collect critical-step-reset data with the current policy.

    on_fit_start        evaluate (round 0), collect round 1's data
                        (resumed: cut the killed round's files, collect the next round's data)
    on_train_epoch_end  check the weights are finite, evaluate after the round, write the round
                        checkpoint, then stop (signal, token budget, last round) or collect the next round

One Lightning epoch is one GPO round; the DataModule rebuilds its dataloader every epoch from the
examples this callback hands it. Everything a round produced (trajectories with their steps,
values and critical step; the training examples) is written under the run directory, by rank 0 only.
With several ranks each generates its contiguous share of the round's prompts and eval rows and the
shares are all-gathered, so every rank holds the same round data.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from gpo_exp.rollout.diagnostics import eval_diagnostics, summary_diagnostics
from gpo_exp.rollout.estimators import Estimator
from gpo_exp.rollout.evaluate import evaluate
from gpo_exp.rollout.gpo_round import GPOConfig, RoundData, collect_round, merge_rounds
from gpo_exp.training.examples import SOURCES, round_examples
from gpo_exp.rollout.sampler import PolicySampler
from gpo_exp.rollout.steps import step_texts
from gpo_exp.training import checkpoint as ckpt
from gpo_exp.training import distributed
from gpo_exp.training.datamodule import RolloutDataModule
from gpo_exp.training.objectives import Objective

log = logging.getLogger(__name__)


@dataclass
class RoundHistory:
    """Per-round records (rounds.jsonl) and run-level totals (summary.json)."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=lambda: {
        "rollout/generated_tokens": 0, "time/rollout_s": 0.0, "time/train_s": 0.0, "time/eval_s": 0.0,
        "gpo/pairs": 0, "gpo/examples": 0, **{f"gpo/examples_{s}": 0 for s in SOURCES},
        "rollout/trajectory_tokens": 0, "gpo/estimation_tokens": 0, "gpo/reset_tokens": 0})
    hist: list[int] = field(default_factory=list)  # critical-step histogram over all rounds
    agree_hits: int = 0
    agree_n: int = 0
    reference_hits: int = 0  # critical step == mc at gpo.reference_k (when that diagnostic is on)
    reference_n: int = 0
    undetermined: int = 0
    explored: int = 0
    estimation_rollouts: float = 0.0
    estimation_tokens: float = 0.0
    stopped: bool = False  # the token budget ended the run early


def no_signal_hint(train_accuracy: float) -> str:
    """Why a round produced no training examples, and what to change. Every optimizer needs trajectories
    of one prompt (or one reset prefix) that differ in reward; a policy that solves all or none gives none."""
    if train_accuracy <= 0.0:
        return ("the policy solved none of its prompts (train accuracy 0.00): give it the answer format first "
                "(warm_start.enabled=true; SmolLM2 on arithmetic: experiment=smollm2_arith) or easier prompts")
    if train_accuracy >= 1.0:
        return "the policy solved every prompt (train accuracy 1.00): give it harder prompts"
    return (f"every group's samples had equal rewards (train accuracy {train_accuracy:.2f}): raise "
            "gpo.samples_per_prompt or engine.temperature")


class Diverged(FloatingPointError):
    """Non-finite weights after a round (or a non-finite loss during one): the run stops here."""

    def __init__(self, message: str, round_idx: int) -> None:
        super().__init__(message)
        self.round = round_idx


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before the time limit


def _jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, default=float) + "\n")


class GPORoundCallback(pl.Callback):
    def __init__(self, sampler: PolicySampler, estimator: Estimator | None, objective: Objective,
                 datamodule: RolloutDataModule, gpo: GPOConfig, train_rows: Sequence[dict[str, Any]],
                 eval_rows: Sequence[dict[str, Any]], eval_samples: int, run_dir: Path, seed: int,
                 reference: Any = None, keep_checkpoints: int = 0, eval_greedy: bool = True) -> None:
        self.sampler, self.estimator, self.objective, self.dm = sampler, estimator, objective, datamodule
        self.gpo, self.train_rows, self.eval_rows = gpo, list(train_rows), list(eval_rows)
        self.eval_samples, self.seed, self.reference = eval_samples, seed, reference
        self.run_dir, self.keep_checkpoints = Path(run_dir), keep_checkpoints
        self.eval_greedy = eval_greedy  # False: the sampled protocol (no greedy decoding)
        self.data_dir = self.run_dir / "rounds"
        self.history = RoundHistory()
        self._train_t0 = 0.0
        self._pending: dict[str, Any] = {}
        self.resumed_from: int | None = None  # round of the checkpoint this run continues from
        self.round = 0  # the round being collected or trained (for a divergence's report)
        self.stop_signal: str | None = None  # name of the stop signal received (checked at round boundaries)
        self.stopped_by_signal: int | None = None  # the round after which a signal stopped the run
        self.wandb_id: str | None = None
        self._rng: dict[str, Any] | None = None
        self._old_handlers: dict[int, Any] = {}

    # --- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers()
        self._sync_engine(pl_module, self.resumed_from or 0)
        if trainer.is_global_zero:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.resumed_from is None:
            with trainer.precision_plugin.forward_context():  # generation and scoring in the trainer's precision (bf16 autocast)
                self._evaluate(trainer, 0)
                self._collect(trainer, pl_module, 1)
        else:
            r = self.resumed_from
            if trainer.is_global_zero:
                cut = ckpt.truncate_partial(self.run_dir, self.history.rounds, r)
                log.info("resumed after round %d%s", r, f"; removed the killed round's {', '.join(cut)}" if cut else "")
            if self._rng is not None:
                ckpt.set_rng_state(self._rng)
            if r < trainer.max_epochs and not self.history.stopped:
                with trainer.precision_plugin.forward_context():
                    self._collect(trainer, pl_module, r + 1)
        self._train_t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers()  # again: Lightning registered its own SIGTERM handler in between

    def _install_handlers(self) -> None:
        # A stop signal is honoured at the next round boundary, after that round's checkpoint, instead of
        # aborting the round in the middle (Lightning's own handler would raise at the next batch).
        for sig in STOP_SIGNALS:
            if sig == signal.SIGUSR1 and "SUBMITIT_EXECUTOR" in os.environ:
                continue  # submitit's own handler requeues the job; the rerun resumes from the last round checkpoint
            old = signal.signal(sig, self._on_signal)
            self._old_handlers.setdefault(sig, old)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name
        log.info("%s received: stopping after this round's checkpoint", self.stop_signal)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.round = trainer.current_epoch + 1
        self._sync_engine(pl_module, None)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dt = time.perf_counter() - self._train_t0
        self.history.totals["time/train_s"] += dt
        r = trainer.current_epoch + 1
        log.info("round %d trained (%.1fs); evaluating", r, dt)
        self._check_finite(pl_module, r)
        self._sync_engine(pl_module, r)
        with trainer.precision_plugin.forward_context():  # generation and scoring in the trainer's precision
            self._evaluate(trainer, r)
        budget = self.gpo.max_generated_tokens
        if budget is not None and self.history.totals["rollout/generated_tokens"] >= budget:
            log.info("token budget reached (%d >= %d): stopping after round %d",
                     self.history.totals["rollout/generated_tokens"], budget, r)
            self.history.stopped = True
        for lg in trainer.loggers:  # what was logged up to the checkpoint is on disk with it (a kill loses no csv row)
            lg.save()
        ckpt.save(trainer, self.run_dir, r, self.keep_checkpoints)
        if distributed.any_rank(self.stop_signal is not None):
            self.stopped_by_signal = r
            trainer.should_stop = True
        elif self.history.stopped:
            trainer.should_stop = True
        elif r < trainer.max_epochs:
            with trainer.precision_plugin.forward_context():
                self._collect(trainer, pl_module, r + 1)
        self._train_t0 = time.perf_counter()

    def _sync_engine(self, pl_module: pl.LightningModule, r: int | None) -> None:
        """An engine with its own copy of the weights (engine.backend=vllm) follows the policy: it loads
        the weights after round r before generating (r=None: training starts, so it may sleep). Called
        on every rank at the same points. The HF engine generates with the module itself: no hook."""
        engine = self.sampler.engine
        if r is None and hasattr(engine, "release"):
            engine.release()
        elif r is not None and hasattr(engine, "follow_policy"):
            engine.follow_policy(pl_module.policy, r)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            print(interrupted_line(self.run_dir), flush=True)

    # --- resume state (Lightning stores it in the checkpoint and hands it back on resume) ----------
    def state_dict(self) -> dict[str, Any]:
        return {"history": asdict(self.history), "rng": ckpt.rng_state(), "wandb_id": self.wandb_id,
                "objective": {k: getattr(self.objective, k) for k in ("skipped_groups", "seen_groups")
                              if hasattr(self.objective, k)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = RoundHistory(**state["history"])
        self.resumed_from = len(self.history.rounds) - 1
        self._rng, self.wandb_id = state["rng"], state.get("wandb_id")
        for k, v in state.get("objective", {}).items():
            setattr(self.objective, k, v)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Only what training changes: the frozen reference and frozen (LoRA base) weights are rebuilt from the
        # warm start on resume, so they are left out (run.py loads with strict_loading off).
        trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        frozen = {n for n, p in pl_module.named_parameters() if not p.requires_grad}
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if k in frozen or (k.startswith("ref.") and k not in trainable)]:
                del state[key]
        checkpoint["gpo_exp"] = {"skipped_batches": getattr(pl_module, "skipped_batches", 0)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if hasattr(pl_module, "skipped_batches"):
            pl_module.skipped_batches = checkpoint.get("gpo_exp", {}).get("skipped_batches", 0)

    def _check_finite(self, pl_module: pl.LightningModule, r: int) -> None:
        """Stop a diverged run: non-finite weights, or finite but huge ones whose logits overflow (lr=1e9)."""
        for name, p in pl_module.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
                raise Diverged(f"non-finite weights in {name} after round {r}", r)
        if not self.eval_rows:
            return
        policy = pl_module.policy
        ids = torch.tensor([self.sampler.encode(self.eval_rows[0])], device=next(policy.parameters()).device)
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad():
                logits = policy(input_ids=ids).logits
        finally:
            policy.train(was_training)
        if not bool(torch.isfinite(logits).all()):
            big = max(float(p.detach().abs().max()) for p in policy.parameters() if p.requires_grad)
            raise Diverged(f"non-finite logits after round {r} (largest trainable weight {big:.3g})", r)

    # --- one round --------------------------------------------------------------------------------
    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, r: int) -> None:
        self.round = r
        rng = random.Random(self.seed * 100_003 + r)
        rows = rng.sample(self.train_rows, min(self.gpo.prompts_per_round, len(self.train_rows)))
        self.sampler.seed = self.seed * 1_000_003 + r
        rank, world = trainer.global_rank, trainer.world_size
        start, end = distributed.shard(len(rows), rank, world)  # whole prompts per rank: their samples dedupe together
        data = collect_round(rows[start:end], self.sampler, self.estimator, self.gpo, seed=self.sampler.seed,
                             uid_start=start * self.gpo.samples_per_prompt)
        if world > 1:
            data = merge_rounds(distributed.gather(data), self.gpo)
        t0 = time.perf_counter()
        examples, by_source = round_examples(self.objective, data.groups, self.gpo, rng)
        data.stats.update(by_source)
        self.objective.precompute(examples, pl_module.policy, getattr(pl_module, "ref", None),
                                  self.sampler.tokenizer.pad_token_id)
        data.stats["time/precompute_s"] = time.perf_counter() - t0
        if hasattr(self.objective, "skipped_groups"):  # GRPO: groups with equal rewards carry no signal
            data.stats["gpo/skipped_groups"] = self.objective.skipped_groups
        self.dm.set_examples(examples, r)
        self._account(data, examples)
        if trainer.is_global_zero:
            self._save(r, data, examples)
        s = data.stats
        log.info("round %d data: %d trajectories (train acc %.2f), %d %s from %d groups%s, %d tokens in %.1fs",
                 r, s["rollout/trajectories"], s["rollout/train_accuracy"], len(examples), self.objective.kind,
                 len(data.groups), f", critical steps {s['gpo/critical_step_hist']}" if self.gpo.enabled else "",
                 s["rollout/round_generated_tokens"], s["time/rollout_s"])
        if not examples:  # say so every round: a run that trains on nothing must not look like one that learns
            log.warning("round %d: no training examples; %s", r, no_signal_hint(s["rollout/train_accuracy"]))
        self._pending = {**{k: v for k, v in s.items() if not isinstance(v, list)}, "gpo/pairs_round": len(examples)}
        self._log_wandb(trainer, r, data)

    def _log_wandb(self, trainer: pl.Trainer, r: int, data: RoundData) -> None:
        """Dashboard panels: a table of sampled trajectories (steps, values, critical step) and a histogram."""
        wandb_loggers = [lg for lg in trainer.loggers if lg.__class__.__name__ == "WandbLogger"]
        if not wandb_loggers or data.localizations is None or not trainer.is_global_zero:
            return
        import wandb

        tok = self.sampler.tokenizer
        table = wandb.Table(columns=["round", "uid", "prompt", "reward", "steps", "values", "critical",
                                     "first_error", "status", "rollout_tokens"])
        shown = [(t, loc) for t, loc in zip(data.trajectories, data.localizations) if loc.status != "skipped"][:16]
        for t, loc in shown:
            steps = step_texts(t.completion_ids, t.step_ends, tok)
            marked = "\n".join(("▶ " if i == loc.critical else "  ") + s.rstrip("\n") for i, s in enumerate(steps))
            values = " ".join("-" if v is None else f"{v:.2f}" for v in loc.values)
            table.add_data(r, t.uid, t.row.get("prompt"), t.reward, marked, values, loc.critical, t.first_error,
                           loc.status, loc.tokens)
        crit = [loc.critical for loc in data.localizations if loc.critical is not None]
        panels: dict[str, Any] = {"gpo/trajectories": table}
        if crit:
            panels["gpo/critical_step"] = wandb.Histogram(crit)
        for lg in wandb_loggers:
            lg.experiment.log(panels)

    def _account(self, data: RoundData, examples: list[dict[str, Any]]) -> None:
        h, s = self.history, data.stats
        h.totals["rollout/generated_tokens"] += s["rollout/round_generated_tokens"]
        h.totals["time/rollout_s"] += s["time/rollout_s"] + s["time/precompute_s"]
        h.totals["gpo/examples"] += len(examples)
        for key in [f"gpo/examples_{src}" for src in SOURCES] + ["rollout/trajectory_tokens", "gpo/estimation_tokens",
                                                                 "gpo/reset_tokens"]:
            h.totals[key] = h.totals.get(key, 0) + s.get(key, 0)  # .get: totals restored from an older checkpoint
        h.totals["gpo/pairs"] += len(examples) if self.objective.kind != "rollouts" else 0
        if data.localizations is not None:
            hist = s["gpo/critical_step_hist"]
            h.hist = [a + b for a, b in zip(h.hist, hist)] if h.hist else list(hist)
            h.agree_hits += s["gpo/agreement_hits"]
            h.agree_n += s["gpo/agreement_n"]
            h.reference_hits += s.get("gpo/reference_hits", 0)
            h.reference_n += s.get("gpo/reference_n", 0)
            h.undetermined += s["gpo/undetermined"]
            h.explored += s["gpo/explored"]
            h.estimation_rollouts += s["gpo/rollouts_per_trajectory"] * s["gpo/explored"]
            h.estimation_tokens += s["gpo/estimation_tokens"]

    def _evaluate(self, trainer: pl.Trainer, r: int) -> None:
        t0 = time.perf_counter()
        greedy: list = []
        res = self._evaluate_shards(trainer, greedy)
        res.update({k.removeprefix("eval/"): v for k, v in eval_diagnostics(  # testbed rows only (planted pivots)
            self.sampler, trainer.lightning_module.policy, self.eval_rows, self.gpo.diagnostics_rows,
            greedy=greedy if trainer.world_size == 1 else None).items()})
        dt = time.perf_counter() - t0
        self.history.totals["time/eval_s"] += dt
        correct = res.pop("diag/greedy_correct", None)  # one 0/1 per diagnosed test row: its own file, not the records
        if correct is not None and trainer.is_global_zero:
            _jsonl(self.data_dir / f"round{r:03d}_eval.jsonl",
                   [{"row": i, "greedy_correct": int(c)} for i, c in enumerate(correct)])
        record = {"round": r, **{f"eval/{k}": v for k, v in res.items()},
                  "rollout/generated_tokens": self.history.totals["rollout/generated_tokens"],
                  "train/examples": self.history.totals["gpo/examples"],  # cumulative: compare arms at equal examples
                  **self._pending}
        if self.gpo.enabled and self.history.hist:
            record["gpo/critical_step_hist"] = list(self.history.hist)
        self.history.rounds.append(record)
        self._pending = {}
        if trainer.is_global_zero:
            with (self.run_dir / "rounds.jsonl").open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "round"}
        for lg in trainer.loggers:
            lg.log_metrics({**scalars, "round": r}, step=trainer.global_step)
        log.info("round %d eval: greedy %s%s (%.1fs)", r, f"{res['accuracy']:.3f}" if "accuracy" in res else "-",
                 f", sampled {res['sampled_accuracy']:.3f}" if "sampled_accuracy" in res else "", dt)

    def _evaluate_shards(self, trainer: pl.Trainer, greedy_out: list | None = None) -> dict[str, float]:
        """evaluate() on this rank's share of the eval rows; the shares' means are combined by row count
        (every metric is a mean over rows, or over rows x samples). `greedy_out` receives this rank's
        greedy generations."""
        start, end = distributed.shard(len(self.eval_rows), trainer.global_rank, trainer.world_size)
        rows = self.eval_rows[start:end]
        part = (evaluate(self.sampler, rows, self.eval_samples, greedy=self.eval_greedy, greedy_out=greedy_out)
                if rows else {}, len(rows))
        if trainer.world_size == 1:
            return part[0]
        parts = [p for p in distributed.gather(part) if p[1]]
        n = sum(k for _, k in parts)
        return {key: sum(res[key] * k for res, k in parts) / n for key in parts[0][0]}

    def _save(self, r: int, data: RoundData, examples: list[dict[str, Any]]) -> None:
        """Trajectories with their steps, values and critical step; the training examples (as text)."""
        tok = self.sampler.tokenizer
        trajs = []
        for i, t in enumerate(data.trajectories):
            rec: dict[str, Any] = {"uid": t.uid, "prompt": t.row.get("prompt"), "answer": t.row.get("answer"),
                                   "reward": t.reward, "steps": step_texts(t.completion_ids, t.step_ends, tok),
                                   "first_error": t.first_error,
                                   # each step's least likely token (log p): where the sample took a chance
                                   "step_min_logprob": ([round(x, 3) for x in t.step_confidence()]
                                                        if t.token_logprobs is not None else None)}
            if data.localizations is not None:
                loc = data.localizations[i]
                rec.update({"values": loc.values, "advantages": loc.advantages, "critical": loc.critical,
                            "status": loc.status, "rollouts": loc.rollouts, "rollout_tokens": loc.tokens})
            trajs.append(rec)
        _jsonl(self.data_dir / f"round{r:03d}_trajectories.jsonl", trajs)
        dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        _jsonl(self.data_dir / f"round{r:03d}_examples.jsonl",
               [{k: (dec(v) if isinstance(v, list) and v and isinstance(v[0], int) else v) for k, v in e.items()}
                for e in examples])

    # --- summary --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        h = self.history
        if not h.rounds:
            return {"rounds": 0, **h.totals}
        first, last = h.rounds[0], h.rounds[-1]
        out: dict[str, Any] = {
            "eval/accuracy_before": first.get("eval/accuracy"), "eval/accuracy_after": last.get("eval/accuracy"),
            "rounds": len(h.rounds) - 1, "eval/rows": len(self.eval_rows), **h.totals, **summary_diagnostics(h.rounds),
        }
        for k in first:
            if k.startswith("eval/") and k != "eval/accuracy":
                out[f"{k}_before"], out[f"{k}_after"] = first[k], last.get(k)
        if self.gpo.enabled:
            out.update({
                "gpo/critical_step_hist": h.hist,
                "gpo/critical_agrees_first_error": h.agree_hits / h.agree_n if h.agree_n else None,
                "gpo/agreement_n": h.agree_n,
                "gpo/undetermined": h.undetermined,
                "gpo/explored": h.explored,
                "gpo/rollouts_per_trajectory": h.estimation_rollouts / h.explored if h.explored else 0.0,
                "gpo/rollout_tokens_per_trajectory": h.estimation_tokens / h.explored if h.explored else 0.0,
            })
            if self.gpo.reference_k:
                out["gpo/critical_agrees_reference"] = h.reference_hits / h.reference_n if h.reference_n else None
                out["gpo/reference_n"] = h.reference_n
        return out


def interrupted_line(run_dir: Path) -> str:
    """What Ctrl-C prints: where the partial run is and the command that continues it."""
    last = ckpt.latest(run_dir)
    where = f"after round {last[0]}" if last else "from the start (no round finished)"
    return f"interrupted: partial run in {run_dir}; continue it {where} with: python -m gpo_exp.run resume={run_dir}"
