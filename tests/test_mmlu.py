"""MMLU and MMLU-Pro on local files in the hub's columns: loading, prompts, grading, bad rows, filters, breakdowns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpo_exp.benchmarks import get
from gpo_exp.registry import ConfigError

FIX = Path(__file__).parent / "fixtures"


def mmlu(**kw):
    return get("mmlu", data_files=str(FIX / "mmlu.parquet"), **kw)


def mmlu_pro(**kw):
    return get("mmlu_pro", data_files=str(FIX / "mmlu_pro.jsonl"), **kw)


def test_mmlu_rows_from_the_hub_columns():
    """question, subject, choices, answer (an index) -> prompt, options, answer letter, option text, subject;
    the row without choices is skipped and counted."""
    rows = mmlu().load("test")
    assert len(rows) == 6
    assert rows[0] == {"prompt": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
                       "options": ["0", "4", "2", "6"], "answer": "B", "answer_text": "4",
                       "subject": "abstract_algebra"}
    assert [r["answer"] for r in rows] == ["B", "D", "B", "B", "C", "B"]


def test_mmlu_pro_rows_from_the_hub_columns():
    rows = mmlu_pro().load("test")
    assert len(rows) == 6
    assert [(r["answer"], r["answer_text"], r["category"]) for r in rows[:4]] == [
        ("B", "2", "math"), ("C", "20 m/s", "physics"), ("D", "1945", "history"), ("C", "Na", "chemistry")]
    assert [len(r["options"]) for r in rows] == [10, 10, 8, 4, 10, 10]


def test_the_prompt_lists_lettered_options_and_asks_for_a_letter():
    bench = mmlu_pro()
    text = bench.prompt(bench.load("test")[1])
    assert "about physics" in text and 'Finish with "The answer is (X)"' in text
    assert "\n(A) 5 m/s\n(B) 10 m/s\n(C) 20 m/s\n" in text and text.endswith("(J) 12 m/s\nAnswer:\n")
    suffixed = mmlu_pro(prompt_suffix="Put the letter within \\boxed{}.")
    assert suffixed.prompt(suffixed.load("test")[1]).endswith("(J) 12 m/s\nPut the letter within \\boxed{}.")


@pytest.mark.parametrize("completion,score", [
    ("2^10 = 1024 = 7 * 146 + 2.\nThe answer is (B).", 1.0),
    ("Answer: B", 1.0),
    ("So the final answer is \\boxed{B}.", 1.0),
    ("1024 mod 7 is 2.\n(B)", 1.0),
    ("The answer is 2.", 1.0),  # the option's text
    ("\\boxed{2}", 1.0),
    ("The answer is (C).", 0.0),  # another letter
    ("\\boxed{C}", 0.0),
    ("The answer is 3.", 0.0),  # another option's text
    ("I think B is likely, or maybe C.", 0.0),  # no answer given in a recognised form
    ("Answer: b", 0.0),  # a lower-case bare letter is a word, not a choice
    ("", 0.0),
])
def test_grading_accepts_the_letter_in_its_usual_forms_and_the_options_text(completion, score):
    bench = mmlu_pro()
    assert bench.score(completion, bench.load("test")[0]) == score


def _write(tmp_path: Path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bench,row,gold", [
    ("mmlu", {"question": "Which is a prime?", "subject": "math", "choices": ["4", "6", "7", "8"], "answer": 4}, "4"),
    ("mmlu", {"question": "Which is a prime?", "subject": "math", "choices": ["4", "6", "7", "8"], "answer": "Z"},
     "'Z'"),
    ("mmlu_pro", {"question": "Which is a prime?", "options": ["4", "6", "7"], "answer": "D", "answer_index": 3,
                  "category": "math"}, "'D (index 3)'"),
    ("mmlu_pro", {"question": "Which is a prime?", "options": ["4", "6", "7"], "answer": "C", "answer_index": 1,
                  "category": "math"}, "'C (index 1)'"),  # letter and index disagree
])
def test_a_row_whose_answer_is_not_among_its_options_is_one_line(tmp_path, bench, row, gold):
    good = {"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1} if bench == "mmlu" else \
        {"question": "2+2?", "options": ["3", "4"], "answer": "B", "answer_index": 1, "category": "math"}
    files = _write(tmp_path, "rows.jsonl", [good, row])
    with pytest.raises(ConfigError) as err:
        get(bench, data_files=files).load("test")
    msg = str(err.value)
    assert "\n" not in msg and f"the answer {gold} of row 'Which is a prime?' is not among its" in msg


def test_subject_and_category_filters_and_a_filter_that_matches_nothing():
    assert [r["subject"] for r in mmlu(subjects=["anatomy"]).load("test")] == ["anatomy", "anatomy"]
    assert {r["category"] for r in mmlu_pro(categories=["math", "law"]).load("test")} == {"math"}
    with pytest.raises(ConfigError) as err:
        mmlu(subjects=["anatomyy"]).load("test")
    assert str(err.value) == ("bad config benchmark.subjects=['anatomyy']: no test row of mmlu has such a subject; "
                              "its subjects: abstract_algebra, anatomy, elementary_mathematics, virology, "
                              "world_religions")
    with pytest.raises(ConfigError, match=r"^bad config benchmark.categories=\['poetry'\]: no test row"):
        mmlu_pro(categories=["poetry"]).load("test")
    with pytest.raises(ConfigError, match=r"benchmark.subjects=\[\]"):
        mmlu(subjects=[])


def test_offline_without_files_is_one_line_naming_the_columns(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        get("mmlu_pro").load("test")
    assert "set benchmark.data_files=" in str(err.value) and "answer_index" in str(err.value)


def test_eval_breaks_results_down_by_subject_with_exact_means(monkeypatch):
    """A scripted engine answers right on every anatomy question and wrong elsewhere: anatomy 1.0, others 0.0,
    and the per-subject means average (weighted by n) to the benchmark's accuracy."""
    from gpo_exp.eval import evaluate_model
    from gpo_exp.rollout.engine import Generation, HFRolloutEngine

    bench = mmlu()
    rows = bench.load("test")

    def generate(self, prefixes, sample_ids, *, seed, greedy=False, max_new_tokens=None, temperature=None):
        from transformers import AutoTokenizer  # noqa: F401  (the tokenizer is the engine's model's)

        out = []
        for p in prefixes:
            text = TOKENIZER[0].decode(p, skip_special_tokens=True)
            row = next(r for r in rows if r["prompt"] in text)
            ans = f"The answer is ({row['answer']})." if row["subject"] == "anatomy" else "The answer is (A)."
            ids = TOKENIZER[0](ans, add_special_tokens=False).input_ids + [self.eos_id]
            out.append(Generation(ids=ids, finished=True))
        return out

    TOKENIZER: list = []
    import gpo_exp.eval as ev

    real_load = ev.load_model

    def load_model(cfg):
        model, tok, desc = real_load(cfg)
        TOKENIZER.append(tok)
        return model, tok, desc

    monkeypatch.setattr(ev, "load_model", load_model)
    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    result = evaluate_model({"model": {"name": "qwen", "source": "random", "path": "Qwen/Qwen2.5-0.5B-Instruct",
                                       "n_layer": 1, "n_embd": 32, "n_head": 2},
                             "benchmarks": ["mmlu"], "bench": {"mmlu": {"name": "mmlu", "data_files":
                                                                        str(FIX / "mmlu.parquet")}},
                             "samples": 0, "logger": {"wandb": False}})
    by = result["breakdown"]["mmlu"]
    assert by["anatomy"] == {"n": 2, "accuracy": 1.0}
    assert all(v["accuracy"] == 0.0 for k, v in by.items() if k != "anatomy")
    assert sum(v["n"] for v in by.values()) == 6 and result["benchmarks"]["mmlu"]["accuracy"] == pytest.approx(2 / 6)
