"""The memory bench measures the old log-prob path by swapping `batching.token_logps`; on a GPU every
measurement runs in one process, so the swap must be undone before the next ("new") measurement."""
from __future__ import annotations

import argparse

import pytest

from gpo_exp.bench import memory
from gpo_exp.training import batching

ARGS = argparse.Namespace(device="cpu", shape=None, hidden=16, layers=1, score_seqs=2, bf16=False)
VOCAB, LENGTH = 64, memory.PROMPT + 6


def test_an_in_process_old_measurement_leaves_the_new_path_in_place(monkeypatch):
    calls = {"old": 0, "new": 0}
    real_new, real_old = batching.token_logps, memory.old_token_logps

    def new(*a, **k):
        calls["new"] += 1
        return real_new(*a, **k)

    def old(*a, **k):
        calls["old"] += 1
        return real_old(*a, **k)

    monkeypatch.setattr(batching, "token_logps", new)
    monkeypatch.setattr(memory, "old_token_logps", old)
    for op in ("precompute", "dpo-step"):  # as run_one calls measure on a GPU: in this process
        memory.measure(VOCAB, LENGTH, "old", op, ARGS)
        assert batching.token_logps is new
        n_old = calls["old"]
        memory.measure(VOCAB, LENGTH, "new", op, ARGS)
        assert calls["old"] == n_old and calls["new"] > 0  # the "new" figure measured the new path
    assert calls["old"] >= 2


def test_a_failing_old_measurement_restores_the_new_path_too():
    before = batching.token_logps
    with pytest.raises(Exception):
        memory.measure(VOCAB, -5, "old", "precompute", ARGS)  # fails once the model is built
    assert batching.token_logps is before
