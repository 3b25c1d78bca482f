"""Does a benchmark fit the tiny model's context? (Its character tokenizer: one token per character.)

Past `model.max_len` GPT-2's position table ends, and the warm start or generation died with an
IndexError traceback; instead a run (or one benchmark of an eval) stops at start with one line.
"""
from __future__ import annotations

from typing import Any, Sequence

from gpo_exp.registry import ConfigError

SPECIALS = 3  # bos, eos, and the newline between prompt and completion


def tokens_needed(benchmark: Any, rows: Sequence[dict[str, Any]]) -> int:
    """Longest (prompt + solution) or (prompt + max_new_tokens) over `rows`, in characters, plus specials."""
    longest = 0
    for row in rows:
        p = len(benchmark.prompt(row))
        longest = max(longest, p + len(str(row.get("solution") or "")), p + benchmark.cfg.max_new_tokens)
    return longest + SPECIALS


def check_fits(model_cfg: Any, benchmark: Any, rows: Sequence[dict[str, Any]]) -> None:
    """ConfigError (one line, with the override that fixes it) when the tiny model's context is too short."""
    if getattr(model_cfg, "source", None) != "tiny":
        return
    need = tokens_needed(benchmark, rows)
    if need > model_cfg.max_len:
        raise ConfigError(f"bad config model.max_len={model_cfg.max_len}: benchmark {benchmark.name} needs "
                          f"{need} tokens with the tiny model (longest prompt + solution or max_new_tokens); "
                          f"set model.max_len={need} (a new warm start is trained) or use a hub model")
