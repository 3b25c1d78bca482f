"""Step segmentation on token offsets.

The rule (`StepsConfig`), in order:
  1. cut after every delimiter (the paper's code: "\\n", "\\n\\n", ".\\n", ".\\n\\n"; a run of
     delimiters is one cut; a delimiter at the very end opens no empty step);
  2. a step shorter than `min_tokens` tokens is merged into the next one, and a too-short last step
     into the one before it (the paper: 30 tokens);
  3. more than `max_steps` steps left (the paper: 30): with overflow=balance, neighbouring steps are
     merged into exactly `max_steps` spans of similar token length (the k-th span ends at the step
     boundary nearest to k/max_steps of the completion), so the critical step can land anywhere in a
     long chain; with overflow=tail (the old rule, kept for tiny/arith) steps max_steps.. join the last.
Boundaries are token offsets into the sampled ids, so every prefix handed to the policy later is
exactly the token sequence it produced (no re-tokenization drift). Merging only removes boundaries,
so every span still ends where a delimiter did.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Sequence

from gpo_exp.benchmarks.base import StepsConfig

if TYPE_CHECKING:  # type only: config validation imports this module before transformers
    from transformers import PreTrainedTokenizerBase


def token_char_ends(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
    """Decoded text and, for each token j, the length of the text decoded from ids[:j+1]."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    if "".join(pieces) == text:  # fast path: tokens decode independently (char and most BPE vocabularies)
        ends, total = [], 0
        for p in pieces:
            total += len(p)
            ends.append(total)
        return text, ends
    # Slow path (byte-level pieces that only form characters together): decode every prefix.
    prefixes = tokenizer.batch_decode([list(ids[: j + 1]) for j in range(len(ids))], skip_special_tokens=True)
    return text, [len(p) for p in prefixes]


def delimiter_ends(text: str, delimiters: Sequence[str]) -> list[int]:
    """Character offsets just after each delimiter occurrence (longest delimiter wins at a position)."""
    delims = sorted(delimiters, key=len, reverse=True)
    out, pos = [], 0
    while pos < len(text):
        for d in delims:
            if text.startswith(d, pos):
                pos += len(d)
                # A run such as "\n\n\n" is one boundary: extend over repeated delimiters.
                while any(text.startswith(d2, pos) for d2 in delims):
                    pos += len(next(d2 for d2 in delims if text.startswith(d2, pos)))
                out.append(pos)
                break
        else:
            pos += 1
    return out


def split_steps(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, cfg: StepsConfig) -> list[int]:
    """Exclusive end token offset of each step of `ids`; the last one is len(ids). Empty ids -> []."""
    n = len(ids)
    if n == 0:
        return []
    text, ends = token_char_ends(ids, tokenizer)
    bounds: list[int] = []
    j = 0
    for c in delimiter_ends(text, cfg.delimiters):
        if c >= len(text):  # a trailing delimiter (then only eos/specials) does not open an empty step
            break
        while j < n and ends[j] < c:  # first token whose text reaches past the delimiter
            j += 1
        if j + 1 < n and (not bounds or j + 1 > bounds[-1]):
            bounds.append(j + 1)
    bounds.append(n)
    return _merge(bounds, cfg.min_tokens, cfg.max_steps, cfg.overflow)


def _merge(bounds: list[int], min_tokens: int, max_steps: int, overflow: str = "tail") -> list[int]:
    merged: list[int] = []
    start = 0
    for b in bounds:
        if b - start >= min_tokens or b == bounds[-1]:
            merged.append(b)
            start = b
    if len(merged) > 1 and merged[-1] - merged[-2] < min_tokens:
        merged.pop(-2)  # a too-short last step joins the one before it
    if len(merged) <= max_steps:
        return merged
    if overflow == "balance":
        return balance_spans(merged, max_steps)
    return merged[: max_steps - 1] + [merged[-1]]


def balance_spans(bounds: Sequence[int], n_spans: int) -> list[int]:
    """Keep `n_spans` of the step ends `bounds` (the last always): span k ends at the boundary nearest
    to k * total / n_spans, among those that leave one boundary for each span still to come."""
    m, total = len(bounds), bounds[-1]
    if m <= n_spans:
        return list(bounds)
    out, prev = [], -1  # prev: index in bounds of the last kept cut
    for k in range(1, n_spans):
        lo, hi = prev + 1, (m - 1) - (n_spans - k)  # indices allowed for the k-th cut
        target = k * total / n_spans
        j = min(max(bisect.bisect_left(bounds, target, lo, hi + 1), lo), hi)
        if j > lo and target - bounds[j - 1] <= bounds[j] - target:
            j -= 1  # the boundary before the target is at least as near
        out.append(bounds[j])
        prev = j
    return out + [total]


def step_texts(ids: Sequence[int], step_ends: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Decoded text of each step."""
    starts = [0, *step_ends[:-1]]
    return tokenizer.batch_decode([list(ids[s:e]) for s, e in zip(starts, step_ends)], skip_special_tokens=True)
