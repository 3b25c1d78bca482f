"""The embedded arith benchmark: generation, grading, and the ground-truth step checker."""
from __future__ import annotations

import collections

from gpo_exp.benchmarks import get


def test_worked_solution_is_correct_line_by_line_and_scores_1():
    b = get("arith")
    rows = b.load("test")
    for row in rows:
        lines = row["solution"].split("\n")
        assert lines[-1] == f"Answer: {row['answer']}"
        value = int(row["prompt"].split(" ")[1].split(",")[0])
        for line, op in zip(lines[:-1], row["prompt"].split(",")[1:]):
            lhs, rhs = line.split("=")
            assert lhs == f"{value}{op}"
            value = eval(lhs)  # the line's arithmetic is right
            assert int(rhs) == value
        assert str(value) == row["answer"]
        assert b.score(row["solution"], row) == 1.0
        assert b.first_wrong_step(lines, row) is None


def test_splits_are_seeded_and_disjoint():
    b = get("arith")
    train, val, test = (set(r["prompt"] for r in b.load(s)) for s in ("train", "val", "test"))
    assert len(test) == 300 and len(val) == 200 and len(train) == 20000
    assert not (train & test) and not (train & val) and not (val & test)
    assert [r["prompt"] for r in get("arith").load("test")[:5]] == [r["prompt"] for r in b.load("test")[:5]]
    assert [r["prompt"] for r in get("arith", seed=1).load("test")[:5]] != [r["prompt"] for r in b.load("test")[:5]]


def test_hard_step_is_never_the_first_line():
    rows = get("arith").load("train")
    mul_line = collections.Counter(next(i for i, l in enumerate(r["lines"]) if "*" in l) for r in rows)
    assert mul_line[0] == 0 and sum(mul_line.values()) == len(rows)
    assert set(mul_line) <= {1, 2, 3}


def test_score_reads_the_last_answer_and_rejects_wrong_or_missing():
    b = get("arith")
    row = {"prompt": "Q: 7,+5,*2", "answer": "24", "lines": ["7+5=12", "12*2=24", "Answer: 24"]}
    assert b.score("7+5=12\n12*2=24\nAnswer: 24", row) == 1.0
    assert b.score("Answer: 23\nAnswer: 24", row) == 1.0
    assert b.score("7+5=12\n12*2=25\nAnswer: 25", row) == 0.0
    assert b.score("7+5=12\n12*2=24", row) == 0.0
    assert b.score("", row) == 0.0


def test_first_wrong_step_is_the_first_line_that_differs_from_gold():
    b = get("arith")
    row = {"prompt": "Q: 7,+5,*2,-3", "answer": "21", "lines": ["7+5=12", "12*2=24", "24-3=21", "Answer: 21"]}
    assert b.first_wrong_step(["7+5=12", "12*2=26", "26-3=23", "Answer: 23"], row) == 1
    assert b.first_wrong_step(["7+5=13", "13*2=26", "26-3=23", "Answer: 23"], row) == 0
    # a right line after a wrong one does not move the first error
    assert b.first_wrong_step(["7+5=12", "12*2=24", "24-3=20", "Answer: 21"], row) == 2
    assert b.first_wrong_step(["7+5=12", "12*2=24", "24-3=21", "Answer: 20"], row) == 3
    assert b.first_wrong_step(["7+5=12 ", "12*2=24", "24-3=21", "Answer: 21"], row) is None  # whitespace-tolerant
    assert b.first_wrong_step(["7+5=12", "12*2=24", "24-3=21", "24-3=21", "Answer: 21"], row) == 3  # an extra line
