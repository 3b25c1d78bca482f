"""Real benchmarks on local fixtures (each in its hub's column format), gsm_symbolic, and offline behaviour."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from itertools import islice

from omegaconf import OmegaConf

from gpo_exp.benchmarks import BENCHMARKS, get, hub
from gpo_exp.benchmarks.gsm_symbolic import _items
from gpo_exp.benchmarks.hub import derive_splits, read_records
from gpo_exp.registry import ConfigError

FIX = Path(__file__).parent / "fixtures"
HUB_NAMES = ["gsm8k", "math500", "bbh", "aime24", "aime25", "date"]

# name -> (fixture file, well-formed rows, malformed rows)
FIXTURES = {
    "gsm8k": ("gsm8k.jsonl", 6, 1),
    "math500": ("math500.jsonl", 6, 1),
    "bbh": ("bbh.json", 6, 1),
    "aime24": ("aime24.parquet", 3, 1),
    "aime25": ("aime25.json", 3, 1),
    "date": ("date.parquet", 5, 1),
}

MATH_WRONG = {  # a wrong final answer per MATH-500 fixture problem
    "test/precalculus/807.json": "\\left( 3, \\frac{\\pi}{3} \\right)",
    "test/intermediate_algebra/1994.json": "p + q",
    "test/algebra/2584.json": "\\frac{13}{3}",
    "test/number_theory/572.json": "8",
    "test/number_theory/515.json": "64",
    "test/algebra/1349.json": "\\text{Angela}",
}
BBH_WRONG = {"(B)": "(A)", "(D)": "(C)", "False": "True", "Yes": "No", "8": "9"}


def load_fixture(name: str):
    path, _, _ = FIXTURES[name]
    bench = get(name, data_files={"test": str(FIX / path)}, derived_fraction=0.0)
    return bench, bench.load("test")


def gold_completion(name: str, row: dict) -> str:
    if row.get("solution"):
        return row["solution"]
    if name == "aime25":
        return f"Adding the cases gives the total.\nSo the final answer is $\\boxed{{{row['answer']}}}$."
    if name == "date":
        return f"Today is known, so I count the days.\nSo the answer is ({row['answer']})."
    return f"Let's think step by step.\nSo the answer is {row['answer']}."


def wrong_completion(name: str, row: dict) -> str:
    if name == "gsm8k":
        return re.sub(r"#### .*$", f"#### {int(row['answer']) + 1}", row["solution"])
    if name == "math500":
        return row["solution"].replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{MATH_WRONG[row['unique_id']]}}}")
    if name in ("aime24", "aime25"):
        return f"So the final answer is $\\boxed{{{int(row['answer']) + 1}}}$."
    if name == "date":
        other = "A" if row["answer"] != "A" else "B"
        return f"I count the days.\nSo the answer is ({other})."
    return f"Let's think step by step.\nSo the answer is {BBH_WRONG[row['answer']]}."


@pytest.mark.parametrize("name", HUB_NAMES)
def test_fixture_rows_load_and_malformed_are_counted(name, caplog):
    _, n_good, n_bad = FIXTURES[name]
    with caplog.at_level(logging.WARNING):
        _, rows = load_fixture(name)
    assert len(rows) == n_good
    assert f"{name}/test: skipped {n_bad} malformed rows" in caplog.text
    assert all(isinstance(r["prompt"], str) and isinstance(r["answer"], str) and r["answer"] for r in rows)


@pytest.mark.parametrize("name", HUB_NAMES)
def test_gold_scores_one_and_perturbed_scores_zero(name):
    bench, rows = load_fixture(name)
    n_good = FIXTURES[name][1]
    assert sum(bench.score(gold_completion(name, r), r) for r in rows) == n_good
    assert sum(bench.score(wrong_completion(name, r), r) for r in rows) == 0
    for r in rows:  # no extractable answer scores 0
        assert bench.score("", r) == 0.0
        assert bench.score("I am not sure how to solve this.", r) == 0.0


def test_gsm8k_rows_prompt_and_solution():
    bench, rows = load_fixture("gsm8k")
    assert [r["answer"] for r in rows] == ["72", "10", "5", "42", "624", "18"]
    assert all("<<" not in r["solution"] for r in rows)  # calculator annotations stripped
    assert rows[0]["solution"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                   "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    assert bench.prompt(rows[1]) == (
        "Solve the math word problem. Think step by step and write one step per line. On the last line write "
        "the final answer as \"#### <number>\".\n\nQuestion: Weng earns $12 an hour for babysitting. Yesterday, "
        "she just did 50 minutes of babysitting. How much did she earn?\nAnswer:\n")
    assert bench.score("Weng earns $0.2 per minute.\nSo she earned $10.\n\\boxed{10}", rows[1]) == 1.0


def test_math500_accepts_equivalent_forms():
    bench, rows = load_fixture("math500")
    assert [r["unique_id"] for r in rows] == list(MATH_WRONG)
    assert [r["level"] for r in rows] == [2, 5, 3, 3, 3, 2]
    frac = next(r for r in rows if r["answer"] == "\\frac{14}{3}")
    assert bench.score("2 + 5/3 + 1\nSo the answer is $\\boxed{14/3}$.", frac) == 1.0
    assert bench.score("\\boxed{4.6667}", frac) == 0.0
    assert bench.prompt(frac).startswith("Solve the problem. Think step by step and write one step per line. "
                                         "Put the final answer in \\boxed{}.\n\nProblem: If $f(x)")


def test_bbh_choice_and_free_form():
    bench, rows = load_fixture("bbh")
    assert [r["task"] for r in rows] == ["hyperbaton", "logical_deduction_three_objects", "date_understanding",
                                         "boolean_expressions", "web_of_lies", "object_counting"]
    hyper, counting = rows[0], rows[5]
    assert bench.prompt(hyper).endswith("End with \"So the answer is (X).\" where X is the letter of the correct "
                                        "option.\nAnswer:\n")
    assert bench.prompt(counting).endswith("End with \"So the answer is <answer>.\"\nAnswer:\n")
    assert bench.score("the answer is (b)", hyper) == 1.0
    assert bench.score("So the answer is 8 instruments.", counting) == 1.0
    assert bench.score("So the answer is **yes**.", rows[4]) == 1.0


def test_date_options_are_lettered_and_text_answers_count():
    bench, rows = load_fixture("date")
    assert [r["answer"] for r in rows] == ["D", "B", "F", "A", "B"]
    assert rows[0]["prompt"] == ("Q: Today is Christmas Eve of 1937. What is the date 10 days ago in MM/DD/YYYY?\n"
                                 "Options:\n(A) 12/14/2026\n(B) 12/14/1950\n(C) 12/14/2007\n(D) 12/14/1937\n"
                                 "(E) 07/14/1938\n(F) 12/14/1988")
    assert bench.score("10 days before 12/24/1937.\nSo the answer is 12/14/1937.", rows[0]) == 1.0
    assert bench.score("So the answer is 12/14/1950.", rows[0]) == 0.0


# --- splits ------------------------------------------------------------------------------------
def test_derive_splits_disjoint_seeded():
    out = derive_splits({"test": list(range(10))}, "test", 0.2, seed=0)
    assert {s: len(v) for s, v in out.items()} == {"test": 6, "train": 2, "val": 2}
    assert sorted(out["train"] + out["val"] + out["test"]) == list(range(10))
    assert out == derive_splits({"test": list(range(10))}, "test", 0.2, seed=0)
    assert out != derive_splits({"test": list(range(10))}, "test", 0.2, seed=1)
    # present splits are kept as they are; only the missing one is carved from the donor
    out = derive_splits({"train": list(range(20)), "test": [100, 101]}, "train", 0.05, seed=0)
    assert len(out["val"]) == 1 and len(out["train"]) == 19 and out["test"] == [100, 101]
    assert derive_splits({"test": [1, 2, 3]}, "test", 0.0, seed=0) == {"test": [1, 2, 3]}


def test_math500_single_file_derives_disjoint_splits():
    # One file is the donor (test); train and val take round(0.2 * 7 raw rows) = 1 row each.
    bench = get("math500", data_files=str(FIX / "math500.jsonl"), derived_fraction=0.2, seed=0)
    ids = {s: [r["unique_id"] for r in bench.load(s)] for s in ("train", "val", "test")}
    assert ids == {"train": ["test/number_theory/515.json"], "val": ["test/algebra/2584.json"],
                   "test": ["test/precalculus/807.json", "test/intermediate_algebra/1994.json",
                            "test/number_theory/572.json", "test/algebra/1349.json"]}
    again = get("math500", data_files=str(FIX / "math500.jsonl"), derived_fraction=0.2, seed=0)
    assert [r["unique_id"] for r in again.load("val")] == ids["val"]


def test_aime_is_eval_only_by_default():
    bench = get("aime25", data_files={"test": str(FIX / "aime25.json")})
    assert [r["answer"] for r in bench.load("test")] == ["70", "16", "117"]
    with pytest.raises(ConfigError, match="split 'train' is empty"):
        bench.load("train")


# --- hub access --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HUB_NAMES)
def test_offline_hub_name_fails_fast_with_hint(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        get(name).load("test")
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and "benchmark.data_files=" in msg


def test_unreachable_hub_fails_fast_without_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")

    def hanging_connect(*args, **kwargs):  # a DNS lookup or connect that never returns in time
        time.sleep(10)
        raise OSError("timed out")

    monkeypatch.setattr(hub.socket, "create_connection", hanging_connect)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 1.0)
    hub._reachable.cache_clear()
    start = time.perf_counter()
    hint = r"\(hub.example.invalid not reachable within 1s\); set benchmark.data_files="
    with pytest.raises(ConfigError, match=hint):
        get("gsm8k").load("test")
    assert time.perf_counter() - start < 5
    hub._reachable.cache_clear()


class _FakeSplit:
    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return list(self.rows)


def test_online_path_maps_hub_splits_and_bbh_tasks(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, config=None):
        calls.append((hub_id, config))
        if hub_id == "HuggingFaceH4/aime_2024":
            return {"train": _FakeSplit([{"problem": "P1", "answer": "204"}, {"problem": "P2", "answer": "25"}])}
        return {"test": _FakeSplit([{"input": f"{config} question\nOptions:\n(A) x\n(B) y", "target": "(A)"}])}

    monkeypatch.setattr(hub, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    aime = get("aime24")
    assert [(r["prompt"], r["answer"]) for r in aime.load("test")] == [("P1", "204"), ("P2", "25")]
    bbh = get("bbh", tasks=["hyperbaton", "snarks"], derived_fraction=0.0)
    assert [(r["task"], r["answer"]) for r in bbh.load("test")] == [("hyperbaton", "(A)"), ("snarks", "(A)")]
    assert calls == [("HuggingFaceH4/aime_2024", None),
                     ("SaylorTwift/bbh", "hyperbaton"), ("SaylorTwift/bbh", "snarks")]


# --- config and file errors ----------------------------------------------------------------------
@pytest.mark.parametrize("name", HUB_NAMES + ["gsm_symbolic", "math"])
def test_yaml_matches_dataclass_defaults(name):
    from_yaml = BENCHMARKS.config(OmegaConf.load(Path(__file__).parents[1] / "conf" / "benchmark" / f"{name}.yaml"))
    config_cls, _ = BENCHMARKS.entry(name)
    assert asdict(from_yaml) == asdict(config_cls())


def test_bad_config_and_files_raise_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"benchmark.derived_fraction=0.7"):
        get("gsm8k", derived_fraction=0.7)
    with pytest.raises(ConfigError, match=r"benchmark.data_files"):
        get("gsm8k", data_files={"dev": "x.jsonl"})
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(ConfigError, match=r"must end in .json, .jsonl or .parquet"):
        get("gsm8k", data_files=str(tmp_path / "x.csv")).load("train")
    with pytest.raises(ConfigError, match=r"no such file"):
        get("gsm8k", data_files=str(tmp_path / "missing.jsonl")).load("train")


def test_read_records_formats(tmp_path):
    p = tmp_path / "task.json"
    p.write_text('{"examples": [{"input": "q1", "target": "(A)"}, 3]}')  # BBH's own file layout
    assert read_records(p) == [{"input": "q1", "target": "(A)"}, {}]
    p = tmp_path / "lines.json"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')  # '.json' that is really JSON lines
    assert read_records(p) == [{"a": 1}, {}, {"a": 2}]
    assert len(read_records(FIX / "date.parquet")) == 6


# --- gsm_symbolic --------------------------------------------------------------------------------
SIZES = {"train": 40, "val": 10, "test": 20}


def _splits(seed: int, sizes=SIZES):
    bench = get("gsm_symbolic", sizes=sizes, seed=seed)
    return bench, {s: bench.load(s) for s in ("train", "val", "test")}


def test_gsm_symbolic_splits_disjoint_and_deterministic():
    bench, splits = _splits(0)
    assert {s: len(r) for s, r in splits.items()} == SIZES
    prompts = {s: [r["prompt"] for r in rows] for s, rows in splits.items()}
    all_prompts = sum(prompts.values(), [])
    assert len(set(all_prompts)) == 70
    _, again = _splits(0)
    assert {s: [r["prompt"] for r in rows] for s, rows in again.items()} == prompts
    _, other = _splits(1)
    assert not set(r["prompt"] for r in other["test"]) & set(prompts["test"])
    _, bigger = _splits(0, {"train": 80, "val": 10, "test": 20})  # more train never moves val/test
    assert [r["prompt"] for r in bigger["test"]] == prompts["test"]
    assert [r["prompt"] for r in bigger["val"]] == prompts["val"]
    # golden first test problem for seed 0 (reasoning-gym 0.1.25)
    first = splits["test"][0]
    assert first["answer"] == "28080" and first["prompt"].startswith("A carpenter works for 2 weeks every month")
    assert not first["prompt"].endswith("Do not include units.")


def test_gsm_symbolic_stream_is_prefix_stable_when_regrown():
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=12, seed=7)
    assert [x["question"] for x in islice(_items(7, 1), 12)] == [ds[i]["question"] for i in range(12)]


def test_gsm_symbolic_gold_solution_scores_one_and_perturbed_zero():
    bench, splits = _splits(0)
    rows = [r for rows in splits.values() for r in rows]
    assert all(re.search(r"\n#### -?\d+(\.\d+)?$", r["solution"]) for r in rows)
    assert sum(bench.score(r["solution"], r) for r in rows) == 70
    perturbed = [re.sub(r"#### (.*)$", lambda m: f"#### {float(m.group(1)) + 1:g}", r["solution"]) for r in rows]
    assert sum(bench.score(p, r) for p, r in zip(perturbed, rows)) == 0
    r = rows[0]
    assert bench.score(f"Work it out.\nThe total is \\boxed{{{r['answer']}}}.", r) == 1.0
    assert bench.score("", r) == 0.0 and bench.score("I do not know.", r) == 0.0
    assert bench.prompt(r).endswith(f"Question: {r['prompt']}\nAnswer:\n")


# --- training data: MATH train (MATH-500 removed), GSM8K train --------------------------------------
def math_train(**kw):
    return get("math", data_files=str(FIX / "math_train.jsonl"), test_data_files=str(FIX / "math500.jsonl"), **kw)


def test_math_trains_on_math_train_without_math500_problems():
    bench = math_train(derived_fraction=0.0)
    train, test = bench.load("train"), bench.load("test")
    assert len(test) == 6 and test[0]["unique_id"] == "test/precalculus/807.json"  # MATH-500 is the test split
    # 6 rows: one repeats a MATH-500 problem (other whitespace) and is removed, one has no \boxed{} (skipped)
    assert bench.removed == 1 and len(train) == 4
    assert not any("196" in r["prompt"] for r in train)
    assert [r["answer"] for r in train] == ["17", "\\frac{3}{4}", "5", "49"]  # gold from the solution's \boxed{}
    assert [r["subject"] for r in train][:2] == ["Algebra", "Prealgebra"]
    prompt = bench.prompt(train[1])
    assert prompt == "Simplify $\\frac{6}{8}$.\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert bench.prompt(test[0]).endswith(hub.PAPER_SUFFIX)  # the test problems get the same suffix
    assert bench.score("so it is $\\boxed{0.75}$", train[1]) == 1.0 and bench.score("\\boxed{3/5}", train[1]) == 0.0


def test_math_val_is_carved_from_train_and_disjoint():
    bench = math_train(derived_fraction=0.25)
    train, val = bench.load("train"), bench.load("val")
    assert len(train) + len(val) == 4 and len(val) == 1
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


def test_math_offline_without_files_names_both_settings():
    with pytest.raises(ConfigError, match="data_files"):
        get("math").load("train")
    with pytest.raises(ConfigError, match="benchmark.test_hub_id"):
        get("math", test_hub_id="", data_files="x.jsonl")


def test_gsm8k_trains_on_its_train_split(tmp_path):
    bench = get("gsm8k", data_files={"train": str(FIX / "gsm8k.jsonl"), "test": str(FIX / "gsm8k.jsonl")},
                derived_fraction=0.0)
    assert get("gsm8k").cfg.split_map["train"] == "train"  # the hub's 7473 train problems
    train = bench.load("train")
    assert len(train) == 6 and train[0]["answer"] == "72"
