"""The policy side of a round: sample trajectories, continue prefixes, score everything.

`PolicySampler` joins an engine (token generation), a tokenizer (decode, step segmentation) and a
benchmark (prompts, grading, ground-truth first wrong step). It is the `ContinuationSampler` that
estimators call, so an estimator never sees a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from gpo_exp.benchmarks.base import Benchmark, StepsConfig
from gpo_exp.models.prompting import encode_prompt
from gpo_exp.rollout.engine import RolloutEngine
from gpo_exp.rollout.steps import split_steps, step_texts
from gpo_exp.rollout.types import Continuation, Job, Trajectory

if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedTokenizerBase


@dataclass
class PolicySampler:
    engine: RolloutEngine
    tokenizer: PreTrainedTokenizerBase
    benchmark: Benchmark
    steps: StepsConfig
    chat_template: bool = True
    seed: int = 0  # the round's sampling seed; sample j of a prefix is fixed for a given seed

    def encode(self, row: dict[str, Any]) -> list[int]:
        return encode_prompt(self.tokenizer, self.benchmark.prompt(row), self.chat_template)

    def reward(self, completion_ids: Sequence[int], row: dict[str, Any], finished: bool) -> float:
        """Outcome reward; a continuation cut off by the length limit scores 0."""
        if not finished:
            return 0.0
        return float(self.benchmark.score(self.tokenizer.decode(completion_ids, skip_special_tokens=True), row))

    def trajectories(self, rows: Sequence[dict[str, Any]], n: int, uid_start: int = 0) -> list[Trajectory]:
        """n sampled trajectories per row, split into steps, scored, with the first wrong step where known."""
        prompts = [self.encode(r) for r in rows]
        gens = self.engine.generate([p for p in prompts for _ in range(n)], [j for _ in rows for j in range(n)],
                                    seed=self.seed)
        out = []
        for i, g in enumerate(gens):
            row, prompt = rows[i // n], prompts[i // n]
            traj = Trajectory(prompt_ids=prompt, completion_ids=g.ids, reward=self.reward(g.ids, row, g.finished),
                              step_ends=split_steps(g.ids, self.tokenizer, self.steps), row=row,
                              text=self.tokenizer.decode(g.ids, skip_special_tokens=True), uid=uid_start + i,
                              token_logprobs=g.logprobs or None, finished=g.finished)
            if traj.reward == 0 and traj.n_steps:
                traj.first_error = self.benchmark.first_wrong_step(
                    step_texts(g.ids, traj.step_ends, self.tokenizer), row)
            out.append(traj)
        return out

    def __call__(self, jobs: Sequence[Job], temperature: float | None = None) -> list[list[Continuation]]:
        """Continuations for each job's prefix (the ContinuationSampler protocol), in one batched call;
        `temperature` overrides the engine's for this call."""
        prefixes, sample_ids, owners = [], [], []
        for k, job in enumerate(jobs):
            prefix = job.traj.prefix_ids(job.step)
            for j in range(job.offset, job.offset + job.n):
                prefixes.append(prefix)
                sample_ids.append(j)
                owners.append(k)
        gens = self.engine.generate(prefixes, sample_ids, seed=self.seed, temperature=temperature) if prefixes else []
        out: list[list[Continuation]] = [[] for _ in jobs]
        for k, g in zip(owners, gens):
            job = jobs[k]
            done = job.traj.completion_ids[: job.traj.prefix_len(job.step)] + g.ids
            out[k].append(Continuation(ids=g.ids, reward=self.reward(done, job.traj.row, g.finished), finished=g.finished))
        return out
