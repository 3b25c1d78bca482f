"""Data that flows through one GPO round: trajectories, continuation jobs, and localisations.

Everything here is plain data (no torch, no Lightning) so estimators can be tested with scripted
samplers and the same objects can be saved to jsonl for inspection.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


@dataclass
class Continuation:
    """One sampled continuation of a prefix, scored against the benchmark row."""

    ids: list[int]  # generated token ids (the eos token included when the model stopped)
    reward: float  # final-answer correctness of prefix + continuation, in [0, 1]
    finished: bool = True  # False when the length limit cut it off (such a continuation scores 0)
    drawn: bool = True  # False for a sibling trajectory's own continuation, reused at no generation cost
    frozen: int = 0  # leading ids copied from a shared prefix, never trained under loss_mask=continuation (mix=substitute)


@dataclass
class Trajectory:
    """A sampled solution split into steps on token offsets.

    Step i (0-based) is completion_ids[step_start(i):step_ends[i]]. Prefix i is the prompt plus the
    first i steps, so prefix 0 is the prompt alone and prefix n_steps is the whole trajectory.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    step_ends: list[int]  # exclusive end offset of each step in completion_ids; last == len(completion_ids)
    row: dict[str, Any] = field(default_factory=dict)  # the benchmark row (prompt, answer, ...)
    text: str = ""  # decoded completion, for logs
    first_error: int | None = None  # ground-truth first wrong step, where the benchmark knows it
    uid: int = 0  # index of the trajectory within its round
    token_logprobs: list[float] | None = None  # the policy's log p of each completion token when sampled (None: engine gave none)
    finished: bool = True  # False when the length limit cut the trajectory off (it then scores 0)

    @property
    def n_steps(self) -> int:
        return len(self.step_ends)

    def step_start(self, i: int) -> int:
        return 0 if i == 0 else self.step_ends[i - 1]

    def prefix_len(self, i: int) -> int:
        """Number of completion tokens in prefix i (the tokens of steps 0..i-1)."""
        return self.step_start(i)

    def prefix_ids(self, i: int) -> list[int]:
        """Token-exact prefix i: prompt + completion tokens of steps 0..i-1."""
        return self.prompt_ids + self.completion_ids[: self.prefix_len(i)]

    def step_confidence(self) -> list[float]:
        """Per step, the log-prob of its least likely token: where the sample took a chance."""
        lp = self.token_logprobs
        if lp is None or len(lp) != len(self.completion_ids):
            raise ValueError(f"trajectory {self.uid} has no token log-probs for its {len(self.completion_ids)} "
                             "completion tokens; the confidence prior needs a rollout engine that returns them")
        return [min(lp[self.step_start(i): end], default=0.0) for i, end in enumerate(self.step_ends)]


@dataclass(frozen=True)
class Job:
    """Ask for n continuations of traj's prefix `step`, sample indices offset..offset+n-1.

    Sample index j of a given prefix is deterministic for a fixed round seed, so asking again with
    a larger offset draws fresh samples and asking with the same offset repeats earlier ones.
    """

    traj: Trajectory
    step: int  # prefix index: 0 = prompt only, traj.n_steps = complete trajectory
    n: int
    offset: int = 0


class ContinuationSampler(Protocol):
    """Batched continuation sampling plus scoring. One call should be one batched generation."""

    def __call__(self, jobs: Sequence[Job], temperature: float | None = None) -> list[list[Continuation]]: ...


@dataclass
class Localization:
    """What an estimator found for one trajectory."""

    values: list[float | None]  # V_0..V_n; None where the estimator did not estimate that prefix
    advantages: list[float | None]  # A_i = V_{i+1} - V_i for steps 0..n-1; None where unknown
    critical: int | None  # the critical step; None only when the trajectory was not explored ("skipped")
    status: str  # located | undetermined (values carry no information; step by tie-break) | trivial (one step) | skipped
    rollouts: int = 0  # continuations sampled for this trajectory
    tokens: int = 0  # generated tokens spent on those continuations
    samples: dict[int, list[Continuation]] = field(default_factory=dict)  # prefix index -> continuations drawn

    @property
    def reset_step(self) -> int | None:
        """Prefix index to reset generation to: the prefix just before the critical step."""
        return self.critical


@dataclass
class Group:
    """Scored continuations of one shared prefix: the reset prefix under GPO, the bare prompt in the baseline.

    Base optimizers build their examples from groups (pairs, unpaired examples, or rollouts).
    """

    prompt_ids: list[int]
    prefix_ids: list[int]  # completion tokens before the reset point (empty in the baseline arm)
    continuations: list[Continuation]
    uid: int = -1  # source trajectory (GPO) or first trajectory of the prompt (baseline)
    step: int = 0  # reset step (GPO); 0 in the baseline arm
    source: str = "fresh"  # fresh: the prompt's own samples | reset: sampled at the critical step | tree: the estimator's draws at another prefix
