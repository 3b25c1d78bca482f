"""Testbed diagnostics: error-class shares, agreement with the planted pivot, teacher-forced P(mistake)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gpo_exp.benchmarks import get
from gpo_exp.rollout.diagnostics import (class_shares, diag_rows, mistake_pairs, mistake_probs, pivot_agreement,
                                         round_counts, round_diagnostics, summary_diagnostics)
from gpo_exp.rollout.types import Localization, Trajectory

ROW = {"prompt": "Q: 7,+5,+1,-3", "answer": "10", "pivots": [2], "pivot": 2, "trap_lines": ["13+3=16"],
       "lines": ["7+5=12", "12+1=13", "13-3=10", "Answer: 10"]}


class CharTok:
    """A character tokenizer (ids = code points) with the slice of the HF interface the module uses."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s) for s in seqs]


def _traj(text: str, reward: float, first_error, uid=0) -> Trajectory:
    ids = [ord(c) for c in text]
    ends = [i + 1 for i, c in enumerate(text) if c == "\n"] + ([len(ids)] if not text.endswith("\n") else [])
    return Trajectory(prompt_ids=[1], completion_ids=ids, reward=reward, step_ends=ends, row=ROW,
                      first_error=first_error, uid=uid)


def test_class_shares_exact():
    out = class_shares(["none", "trap", "trap", "collateral", "other", "none", "none", "trap"], "x/")
    assert out == {"x/fail_trap": 0.6, "x/fail_collateral": 0.2, "x/fail_other": 0.2, "x/collateral_rate": 0.125,
                   "x/failures": 5}
    assert class_shares(["none"], "x/")["x/fail_trap"] == 0.0


def test_round_diagnostics_classes_and_pivot_agreement():
    b = get("arith", trap="sign")
    trajs = [_traj("7+5=12\n12+1=13\n13+3=16\nAnswer: 16", 0.0, 2, 0),  # trap, critical 2: hit
             _traj("7+5=12\n12+1=13\n13+3=16\nAnswer: 16", 0.0, 2, 1),  # trap, critical 1: miss
             _traj("7+5=12\n12-1=11\n11-3=8\nAnswer: 8", 0.0, 1, 2),  # collateral
             _traj("7+5=12\n12+1=13\n13-3=10\nAnswer: 10", 1.0, None, 3)]  # right
    locs = [Localization(critical=c, values=[], advantages=[], status="located") for c in (2, 1, 1, None)]
    counts = round_counts(trajs, locs, b, CharTok())
    assert counts == {"diag_n/trap": 2, "diag_n/collateral": 1, "diag_n/other": 0, "diag_n/none": 1,
                      "gpo/pivot_hits": 1, "gpo/pivot_n": 2}
    out = round_diagnostics(counts)
    assert out["rollout/diag/fail_trap"] == pytest.approx(2 / 3) and out["rollout/diag/fail_collateral"] == pytest.approx(1 / 3)
    assert out["rollout/diag/collateral_rate"] == 0.25
    assert (out["gpo/pivot_hits"], out["gpo/pivot_n"], out["gpo/critical_is_pivot"]) == (1, 2, 0.5)
    # two ranks' shares merge by adding counters: the shares are those of the pooled trajectories
    half = [round_counts(trajs[:2], locs[:2], b, CharTok()), round_counts(trajs[2:], locs[2:], b, CharTok())]
    pooled = {k: half[0].get(k, 0) + half[1].get(k, 0) for k in counts}
    assert round_diagnostics(pooled) == out
    assert "gpo/pivot_n" not in round_diagnostics(round_counts(trajs, None, b, CharTok()))
    assert round_counts([_traj("x", 0.0, 0)], None, get("arith"), CharTok()) != {}  # rows carry pivots
    clean = Trajectory(prompt_ids=[1], completion_ids=[1], reward=0.0, step_ends=[1], row={"lines": ["a"]})
    assert round_counts([clean], None, b, CharTok()) == {} and round_diagnostics({}) == {}  # clean rows: none


def test_mistake_pairs_stop_where_the_planted_line_leaves_the_gold_one():
    (ctx, tok), = mistake_pairs(CharTok(), [[1, 2]], [ROW])
    assert ctx[:2] == [1, 2] and "".join(map(chr, ctx[2:])) == "7+5=12\n12+1=13\n13" and chr(tok) == "+"
    row = {**ROW, "pivots": [0], "lines": ["9*4=36", "Answer: 36"], "trap_lines": ["9*5=45"]}
    (ctx, tok), = mistake_pairs(CharTok(), [[1]], [row])
    assert "".join(map(chr, ctx[1:])) == "9*" and chr(tok) == "5"


class FixedLM(torch.nn.Module):
    """logits[t] depend on the last real token only: token v puts logit v/10 on id (v + 1) % 8."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 8)
        logits.scatter_(-1, ((input_ids + 1) % 8)[..., None], (input_ids[..., None].float() / 10) + 1.0)
        return SimpleNamespace(logits=logits)


def test_mistake_probs_read_the_last_real_position_of_right_padded_batches():
    lm = FixedLM()
    probs = mistake_probs(lm, [([3, 5], 6), ([2], 3), ([4, 4, 1], 5)], pad_id=0, batch=2)
    want = [math.exp(1.5) / (math.exp(1.5) + 7), math.exp(1.2) / (math.exp(1.2) + 7), 1 / (math.exp(1.1) + 7)]
    assert probs == pytest.approx(want, abs=1e-6)


def test_summary_pools_pivot_agreement_and_keeps_first_and_last_rounds():
    recs = [{"round": 0}, {"round": 1, "gpo/pivot_hits": 3, "gpo/pivot_n": 4, "rollout/diag/fail_trap": 0.9},
            {"round": 2, "gpo/pivot_hits": 1, "gpo/pivot_n": 4, "rollout/diag/fail_trap": 0.5}]
    out = summary_diagnostics(recs)
    assert out == {"gpo/critical_is_pivot": 0.5, "gpo/pivot_n": 8, "rollout/diag/fail_trap_first": 0.9,
                   "rollout/diag/fail_trap_last": 0.5}
    assert summary_diagnostics([{"round": 0}]) == {}


def test_diag_rows_is_a_seeded_ordered_subset():
    rows = [{"i": i} for i in range(50)]
    sub = diag_rows(rows, 10)
    assert len(sub) == 10 and sub == diag_rows(rows, 10) and [r["i"] for r in sub] == sorted(r["i"] for r in sub)
    assert diag_rows(rows, 80) == rows
