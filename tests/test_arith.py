"""The embedded arith benchmark: generation, grading, and the ground-truth step checker."""
from __future__ import annotations

import collections
from pathlib import Path

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


# --- the noisy-teacher testbed ------------------------------------------------------------------

import re

import pytest

from gpo_exp.benchmarks.arith import is_flip, teacher_solution
from gpo_exp.registry import ConfigError

TRAP = dict(trap="sign", trap_p=0.5, sizes={"train": 2000, "val": 50, "test": 300})


def _check_chain(solution: str, row: dict, wrong_at: set[int]) -> None:
    """Each line continues from the previous line's value; the planted `+x` exactly at wrong_at."""
    lines = solution.split("\n")
    value = row["start"]
    for i, (line, (op, x)) in enumerate(zip(lines[:-1], row["ops"])):
        used = "+" if i in wrong_at else op
        assert line == f"{value}{used}{x}={eval(f'{value}{used}{x}')}"
        value = eval(f"{value}{used}{x}")
    assert lines[-1] == f"Answer: {value}"


def test_clean_setting_keeps_the_shipped_warm_start_key():
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.training.warmstart import WarmStartConfig, warm_start_key

    ws = WarmStartConfig().resolved(pretrained=False)
    assert warm_start_key(ModelConfig(), get("arith").cfg, ws) == "78e33c903bd90f55"
    # trap fields are ignored while trap=none, and enter the key when it is on
    assert warm_start_key(ModelConfig(), get("arith", trap_p=0.9).cfg, ws) == "78e33c903bd90f55"
    keys = {warm_start_key(ModelConfig(), get("arith", trap="sign", trap_p=p).cfg, ws) for p in (0.5, 0.6)}
    assert len(keys) == 2 and "78e33c903bd90f55" not in keys


def test_sign_trap_plants_exactly_one_pivot_and_the_teacher_continues_from_its_wrong_value():
    b = get("arith", **TRAP)
    train, test = b.load("train"), b.load("test")
    for row in train + test:
        minus = [i for i, (op, _) in enumerate(row["ops"]) if op == "-" and i >= 1]
        assert minus == row["pivots"] == [row["pivot"]]  # the only '-' at line >= 1 is the trap
        p = row["pivot"]
        v = int(row["lines"][p].split("-")[0])
        assert row["trap_lines"] == [f"{v}+{row['ops'][p][1]}={v + row['ops'][p][1]}"]
        # problems, answers and gold lines stay correct
        assert b.score("\n".join(row["lines"]), row) == 1.0 and b.first_wrong_step(row["lines"], row) is None
    for row in test:
        assert row["solution"] == "\n".join(row["lines"]) and "trapped" not in row
    for row in train:
        _check_chain(row["solution"], row, {row["pivot"]} if row["trapped"][0] else set())
        if row["trapped"][0]:
            steps = row["solution"].split("\n")
            assert b.first_wrong_step(steps, row) == row["pivot"] and b.error_class(steps, row) == "trap"
            assert b.score(row["solution"], row) == 0.0
    share = sum(r["trapped"][0] for r in train) / len(train)
    assert 0.47 < share < 0.53


def test_trap_p_changes_only_the_teacher_not_the_problems():
    rows = {p: get("arith", **{**TRAP, "trap_p": p}).load("train") for p in (0.0, 0.5, 1.0)}
    assert [r["prompt"] for r in rows[0.0]] == [r["prompt"] for r in rows[1.0]] == [r["prompt"] for r in rows[0.5]]
    assert all(r["solution"] == "\n".join(r["lines"]) for r in rows[0.0])
    assert all(r["solution"].split("\n")[r["pivot"]] == r["trap_lines"][0] for r in rows[1.0])


def test_teacher_solution_and_mul_trap_exact():
    row = {"start": 9, "ops": [("+", 3), ("*", 4), ("-", 5)], "pivots": [1]}
    assert teacher_solution(row, [True], "mul") == "9+3=12\n12*5=60\n60-5=55\nAnswer: 55"
    assert teacher_solution(row, [False], "mul") == "9+3=12\n12*4=48\n48-5=43\nAnswer: 43"
    row = {"start": 9, "ops": [("+", 3), ("-", 4), ("*", 2)], "pivots": [1]}
    assert teacher_solution(row, [True], "sign") == "9+3=12\n12+4=16\n16*2=32\nAnswer: 32"
    b = get("arith", trap="mul", trap_p=1.0, sizes={"train": 500, "val": 10, "test": 50})
    for r in b.load("train"):
        assert [i for i, (op, _) in enumerate(r["ops"]) if op == "*"] == r["pivots"]
        v, x = int(r["lines"][r["pivot"]].split("*")[0]), r["ops"][r["pivot"]][1]
        assert v > 0 and r["solution"].split("\n")[r["pivot"]] == f"{v}*{x + 1}={v * (x + 1)}"


def test_error_class_trap_collateral_other():
    b = get("arith", trap="sign")
    row = {"prompt": "Q: 7,+5,-3,+2", "answer": "11", "pivots": [2], "pivot": 2, "trap_lines": ["12+3=15"],
           "lines": ["7+5=12", "12-3=9", "9+2=11", "Answer: 11"]}
    row["lines"] = ["7+5=12", "12+1=13", "13-3=10", "Answer: 10"]  # a chain 7,+5,+1,-3
    row.update(prompt="Q: 7,+5,+1,-3", answer="10", trap_lines=["13+3=16"])
    assert b.error_class(["7+5=12", "12+1=13", "13+3=16", "Answer: 16"], row) == "trap"
    assert b.error_class(["7+5=12", "12+1=13", "13-3=10", "Answer: 10"], row) == "none"
    assert b.error_class(["7+5=12", "12-1=11", "11-3=8", "Answer: 8"], row) == "collateral"  # +1 written as -1
    assert b.error_class(["7-5=2", "2+1=3", "3-3=0", "Answer: 0"], row) == "collateral"  # line 0, not a pivot
    assert b.error_class(["7+5=12", "12+1=14", "14-3=11", "Answer: 11"], row) == "other"  # arithmetic slip
    assert b.error_class(["7+5=12", "12+1=13", "13+3=15", "Answer: 15"], row) == "other"  # wrong form at the pivot
    assert b.error_class(["7+5=12", "12+1=13", "13-3=10", "Answer: 11"], row) == "other"  # the answer line
    assert is_flip("12-3=9", "12+3=15", "sign") and not is_flip("12-3=8", "12+3=15", "sign")
    assert is_flip("9*5=45", "9*4=36", "mul") and is_flip("9*3=27", "9*4=36", "mul")
    assert not is_flip("9*6=54", "9*4=36", "mul") and not is_flip("8*5=40", "9*4=36", "mul")


@pytest.mark.parametrize("over, key", [
    ({"trap": "plus"}, "benchmark.trap"), ({"trap": "sign", "trap_p": 1.5}, "benchmark.trap_p"),
    ({"trap": "sign", "traps_per_chain": 2}, "benchmark.traps_per_chain"),  # n_ops[0]=3, n_mul=1, trap_from=1
    ({"trap": "mul", "traps_per_chain": 2}, "benchmark.traps_per_chain"),
    ({"trap": "mul", "trap_from": 2}, "benchmark.trap_from")])
def test_bad_trap_settings_fail_with_the_key(over, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        get("arith", **over)


def test_two_traps_per_chain():
    b = get("arith", trap="sign", traps_per_chain=2, n_ops=[4, 5], trap_p=1.0, sizes={"train": 300, "val": 10, "test": 10})
    for r in b.load("train"):
        assert len(r["pivots"]) == 2 and [i for i, (op, _) in enumerate(r["ops"]) if op == "-" and i >= 1] == r["pivots"]
        _check_chain(r["solution"], r, set(r["pivots"]))


def test_multi_trap_testbed_config_holds_three_traps_and_refuses_a_fourth():
    """conf/benchmark/arith_testbed_multi.yaml: three traps in every 5-6 step chain; a fourth does not fit
    a 5-step chain (n_ops[0] - trap_from - n_mul = 3): one line naming the key and the limit."""
    import yaml

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "benchmark" / "arith_testbed_multi.yaml").read_text())
    conf = {k: v for k, v in conf.items() if k != "name"}
    b = get("arith", **{**conf, "sizes": {"train": 200, "val": 10, "test": 50}})
    rows = b.load("train")
    assert all(len(r["pivots"]) == 3 and 5 <= len(r["ops"]) <= 6 for r in rows)
    assert all(len(r["prompt"]) + len(r["solution"]) + 2 <= 160 for r in rows)  # fits the tiny model (max_len 160)
    with pytest.raises(ConfigError) as e:
        get("arith", **{**conf, "traps_per_chain": 4})
    msg = str(e.value)
    assert "benchmark.traps_per_chain=4" in msg and "<= n_ops[0] - trap_from - n_mul = 3" in msg and "\n" not in msg
