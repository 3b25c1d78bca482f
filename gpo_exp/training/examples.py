"""A round's training examples from its groups, capped per source, and counted per source.

Fresh groups (the prompt's own samples: the whole baseline arm, and GPO's under mix=augment or
substitute) get `examples_per_round`, drawn first from the round's generator exactly as the baseline
draws them, so at equal trajectories the two arms' fresh examples are the same. Reset groups (GPO's
critical-step samples) and tree groups (the estimator's draws at other prefixes) get their own caps
(`reset_examples`, `tree_examples`; null: examples_per_round), so one source never crowds out another.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from gpo_exp.rollout.gpo_round import GPOConfig
from gpo_exp.rollout.types import Group
from gpo_exp.training.objectives.base import Objective

SOURCES = ("fresh", "reset", "tree")


def round_examples(objective: Objective, groups: Sequence[Group], cfg: GPOConfig,
                   rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(examples, {"gpo/examples_<source>": count}); examples carry their group's `source`."""
    caps = {"fresh": cfg.examples_per_round, "reset": cfg.reset_examples or cfg.examples_per_round,
            "tree": cfg.tree_examples or cfg.examples_per_round}
    out: list[dict[str, Any]] = []
    counts = {}
    for source in SOURCES:
        part = [g for g in groups if g.source == source]
        ex = objective.make_examples(part, caps[source], rng, cfg.pairs_per_group) if part else []
        offset = 1 + max((e["group"] for e in out if "group" in e), default=-1)  # rollout groups stay distinct
        for e in ex:
            e["source"] = source
            if "group" in e:
                e["group"] += offset
        counts[f"gpo/examples_{source}"] = len(ex)
        out += ex
    return out, counts
