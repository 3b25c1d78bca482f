"""The reasoning eval protocol: maj@k by answer equivalence, sampled pass@1 without greedy, truncations."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpo_exp.benchmarks import get
from gpo_exp.benchmarks.graders import math_equal
from gpo_exp.models.tiny import char_tokenizer
from gpo_exp.rollout.engine import Generation
from gpo_exp.rollout.evaluate import evaluate, headline_metric, majority
from gpo_exp.rollout.sampler import PolicySampler

ROW = {"prompt": "What is 3/4 as a fraction?", "answer": "\\frac{3}{4}"}


@pytest.mark.parametrize("a,b,same", [
    ("\\frac{3}{4}", "0.75", True), ("\\frac{3}{4}", "3/4", True), ("\\dfrac34", "\\frac{3}{4}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("(1, 2)", "(1,2)", True),
    ("\\frac{3}{4}", "\\frac{4}{3}", False), ("2", "3", False), ("\\text{Angela}", "\\text{Bob}", False),
    (None, "2", False),
])
def test_math_equal(a, b, same):
    assert math_equal(a, b) is same


def test_majority_groups_equivalent_answers_first_group_wins_ties():
    assert majority(["a", "b", "b", None], str.__eq__) == [1, 2]
    assert majority(["a", "b"], str.__eq__) == [0]
    assert majority([None, None], str.__eq__) == []


class Scripted:
    """An engine whose sample j of every prompt is texts[j] (greedy: `greedy_text`); counts greedy calls."""

    def __init__(self, tok, texts, greedy_text="\\boxed{1}", finished=None):
        self.tok, self.texts, self.greedy_text = tok, texts, greedy_text
        self.finished = finished or [True] * len(texts)
        self.greedy_calls = 0
        self.stats = SimpleNamespace(generated_tokens=0)

    def generate(self, prefixes, sample_ids, *, seed, greedy=False, max_new_tokens=None, temperature=None):
        self.greedy_calls += greedy
        out = []
        for j in sample_ids:
            text, done = (self.greedy_text, True) if greedy else (self.texts[j], self.finished[j])
            ids = self.tok(text, add_special_tokens=False).input_ids
            out.append(Generation(ids=ids + [self.tok.eos_token_id] if done else ids, finished=done))
        return out


VOTES = ["So $\\boxed{\\frac{3}{4}}$", "It is \\boxed{0.75}", "\\boxed{\\dfrac{3}{4}}", "\\boxed{2}", "\\boxed{2}",
         "\\boxed{12}"]


def _sampler(texts, **kw):
    bench = get("math500", data_files="unused.jsonl")
    tok = char_tokenizer([ROW["prompt"], bench.prompt(ROW), *texts, "\\boxed{1}"])
    return PolicySampler(Scripted(tok, texts, **kw), tok, bench, bench.cfg.steps, chat_template=False)


def test_maj_at_k_votes_by_math_verify_equivalence():
    """Three equivalent forms of 3/4 outvote two '2's; voting on the last number would pick '2' (or '4')."""
    out = evaluate(_sampler(VOTES), [ROW], samples=6)
    assert out["sampled_accuracy"] == pytest.approx(3 / 6) and out["pass@6"] == 1.0
    assert out["maj@6"] == 1.0 and out["accuracy"] == 0.0 and out["truncated"] == 0.0
    wrong = ["\\boxed{2}", "\\boxed{2.0}", "\\boxed{\\frac{3}{4}}", "\\boxed{0.75}", "\\boxed{\\frac{4}{2}}", "\\boxed{9}"]
    out = evaluate(_sampler(wrong), [ROW], samples=6)  # 2, 2.0 and 4/2 are one group of three: maj is wrong
    assert out["maj@6"] == 0.0 and out["pass@6"] == 1.0


def test_sampled_protocol_skips_greedy_and_counts_truncations():
    sampler = _sampler(VOTES[:4], finished=[True, True, False, True])
    out = evaluate(sampler, [ROW], samples=4, greedy=False)
    assert sampler.engine.greedy_calls == 0 and "accuracy" not in out
    # the cut-off third sample scores 0 and casts no vote: 2 of 4 right; 3/4 still wins 2 votes to 1
    assert out["sampled_accuracy"] == 0.5 and out["maj@4"] == 1.0 and out["truncated"] == 0.25
    assert headline_metric("sampled") == "sampled_accuracy" and headline_metric("greedy") == "accuracy"
    with pytest.raises(ValueError, match="samples >= 1"):
        evaluate(sampler, [ROW], samples=0, greedy=False)


def test_gsm8k_and_choice_final_answers():
    gsm, bbh = get("gsm8k", data_files="x.jsonl"), get("bbh", data_files="x.jsonl")
    assert gsm.final_answer("so\n#### 1,000") == "1000" and gsm.same_answer("1000", "1000.0")
    assert bbh.final_answer("So the answer is (B).") == "B"
    assert get("arith").final_answer("7+5=12\nAnswer: 12") == "12"  # default: the last number
    sym = get("gsm_symbolic")
    assert sym.final_answer("3 + 4 = 7 apples\n#### 7\nThen 12 more") == "7" and sym.same_answer("7", "7.0")
