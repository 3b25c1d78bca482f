"""The generation callback: each round, collect critical-step-reset data with the current policy.

    on_fit_start        evaluate (round 0), collect round 1's data
    on_train_epoch_end  evaluate after the round; stop, or collect the next round's data

One Lightning epoch is one GPO round; the DataModule rebuilds its dataloader every epoch from the
examples this callback hands it. Everything a round produced (trajectories with their steps,
values and critical step; the training examples) is written under the run directory.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl

from gpo_exp.rollout.estimators import Estimator
from gpo_exp.rollout.evaluate import evaluate
from gpo_exp.rollout.gpo_round import GPOConfig, RoundData, collect_round
from gpo_exp.rollout.sampler import PolicySampler
from gpo_exp.rollout.steps import step_texts
from gpo_exp.training.datamodule import RolloutDataModule
from gpo_exp.training.objectives import Objective

log = logging.getLogger(__name__)


@dataclass
class RoundHistory:
    """Per-round records (rounds.jsonl) and run-level totals (summary.json)."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=lambda: {
        "rollout/generated_tokens": 0, "time/rollout_s": 0.0, "time/train_s": 0.0, "time/eval_s": 0.0,
        "gpo/pairs": 0, "gpo/examples": 0})
    hist: list[int] = field(default_factory=list)  # critical-step histogram over all rounds
    agree_hits: int = 0
    agree_n: int = 0
    reference_hits: int = 0  # critical step == mc at gpo.reference_k (when that diagnostic is on)
    reference_n: int = 0
    undetermined: int = 0
    explored: int = 0
    estimation_rollouts: float = 0.0
    estimation_tokens: float = 0.0


def _jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, default=float) + "\n")


class GPORoundCallback(pl.Callback):
    def __init__(self, sampler: PolicySampler, estimator: Estimator | None, objective: Objective,
                 datamodule: RolloutDataModule, gpo: GPOConfig, train_rows: Sequence[dict[str, Any]],
                 eval_rows: Sequence[dict[str, Any]], eval_samples: int, run_dir: Path, seed: int,
                 reference: Any = None, eval_greedy: bool = True) -> None:
        self.sampler, self.estimator, self.objective, self.dm = sampler, estimator, objective, datamodule
        self.gpo, self.train_rows, self.eval_rows = gpo, list(train_rows), list(eval_rows)
        self.eval_samples, self.seed, self.reference = eval_samples, seed, reference
        self.eval_greedy = eval_greedy  # False: the sampled protocol (no greedy decoding)
        self.data_dir = run_dir / "rounds"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.history = RoundHistory()
        self._train_t0 = 0.0
        self._pending: dict[str, Any] = {}

    # --- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with trainer.precision_plugin.forward_context():  # generation and scoring in the trainer's precision (bf16 autocast)
            self._evaluate(trainer, 0)
            self._collect(trainer, pl_module, 1)
        self._train_t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.history.totals["time/train_s"] += time.perf_counter() - self._train_t0
        r = trainer.current_epoch + 1
        with trainer.precision_plugin.forward_context():
            self._evaluate(trainer, r)
            budget = self.gpo.max_generated_tokens
            if budget is not None and self.history.totals["rollout/generated_tokens"] >= budget:
                log.info("token budget reached (%d >= %d): stopping after round %d",
                         self.history.totals["rollout/generated_tokens"], budget, r)
                trainer.should_stop = True
            elif r < trainer.max_epochs:
                self._collect(trainer, pl_module, r + 1)
        self._train_t0 = time.perf_counter()

    # --- one round --------------------------------------------------------------------------------
    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, r: int) -> None:
        rng = random.Random(self.seed * 100_003 + r)
        rows = rng.sample(self.train_rows, min(self.gpo.prompts_per_round, len(self.train_rows)))
        self.sampler.seed = self.seed * 1_000_003 + r
        data = collect_round(rows, self.sampler, self.estimator, self.gpo, seed=self.sampler.seed)
        t0 = time.perf_counter()
        examples = self.objective.make_examples(data.groups, self.gpo.examples_per_round, rng, self.gpo.pairs_per_group)
        self.objective.precompute(examples, pl_module.policy, getattr(pl_module, "ref", None),
                                  self.sampler.tokenizer.pad_token_id)
        data.stats["time/precompute_s"] = time.perf_counter() - t0
        if hasattr(self.objective, "skipped_groups"):  # GRPO: groups with equal rewards carry no signal
            data.stats["gpo/skipped_groups"] = self.objective.skipped_groups
        self.dm.set_examples(examples, r)
        self._account(data, examples)
        self._save(r, data, examples)
        s = data.stats
        log.info("round %d data: %d trajectories (train acc %.2f), %d %s from %d groups%s, %d tokens in %.1fs",
                 r, s["rollout/trajectories"], s["rollout/train_accuracy"], len(examples), self.objective.kind,
                 len(data.groups), f", critical steps {s['gpo/critical_step_hist']}" if self.gpo.enabled else "",
                 s["rollout/round_generated_tokens"], s["time/rollout_s"])
        self._pending = {**{k: v for k, v in s.items() if not isinstance(v, list)}, "gpo/pairs_round": len(examples)}
        self._log_wandb(trainer, r, data)

    def _log_wandb(self, trainer: pl.Trainer, r: int, data: RoundData) -> None:
        """Dashboard panels: a table of sampled trajectories (steps, values, critical step) and a histogram."""
        wandb_loggers = [lg for lg in trainer.loggers if lg.__class__.__name__ == "WandbLogger"]
        if not wandb_loggers or data.localizations is None:
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
        res = evaluate(self.sampler, self.eval_rows, self.eval_samples, greedy=self.eval_greedy)
        dt = time.perf_counter() - t0
        self.history.totals["time/eval_s"] += dt
        record = {"round": r, **{f"eval/{k}": v for k, v in res.items()},
                  "rollout/generated_tokens": self.history.totals["rollout/generated_tokens"],
                  **self._pending}
        if self.gpo.enabled and self.history.hist:
            record["gpo/critical_step_hist"] = list(self.history.hist)
        self.history.rounds.append(record)
        self._pending = {}
        with (self.data_dir.parent / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "round"}
        for lg in trainer.loggers:
            lg.log_metrics({**scalars, "round": r}, step=trainer.global_step)
        log.info("round %d eval: greedy %s%s (%.1fs)", r, f"{res['accuracy']:.3f}" if "accuracy" in res else "-",
                 f", sampled {res['sampled_accuracy']:.3f}" if "sampled_accuracy" in res else "", dt)

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
        first, last = h.rounds[0], h.rounds[-1]
        out: dict[str, Any] = {
            "eval/accuracy_before": first.get("eval/accuracy"), "eval/accuracy_after": last.get("eval/accuracy"),
            "rounds": len(h.rounds) - 1, **h.totals,
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
