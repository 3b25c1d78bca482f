"""Step segmentation on token offsets: exact boundaries, merging, caps, and token-exact prefixes."""
from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gpo_exp.benchmarks.base import StepsConfig
from gpo_exp.models.tiny import char_tokenizer
from gpo_exp.registry import ConfigError
from gpo_exp.rollout.steps import delimiter_ends, split_steps, step_texts, token_char_ends
from gpo_exp.rollout.types import Trajectory

PAPER = ["\n", "\n\n", ".\n", ".\n\n"]  # the paper's delimiters


@pytest.fixture(scope="module")
def chars() -> PreTrainedTokenizerFast:
    return char_tokenizer(["7+5=12\n12-3=9\nAnswer: 9 abcde Q:,"])


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """A word-piece tokenizer whose vocabulary has multi-character tokens, ".\\n\\n" among them."""
    vocab = ["<pad>", "<eos>", "<unk>", "The", " sum", " is", " 5", ".\n\n", "So", " x", ".\n", "\n\n", "\n",
             "Done", "End", "!", ".", "\nNext"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    # Longest pieces first, so ".\n\n" is one token when the text is tokenized canonically.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\.\n\n|\.\n|\n\n|\nNext|\n|\.| ?[A-Za-z0-9]+|!"),
                                            behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def enc(tok: PreTrainedTokenizerFast, text: str, eos: bool = False) -> list[int]:
    ids = tok(text, add_special_tokens=False).input_ids
    return ids + [tok.eos_token_id] if eos else ids


# --- arith-style completion with the char tokenizer ----------------------------------------------

def test_arith_completion_char_tokenizer(chars):
    ids = enc(chars, "7+5=12\n12-3=9\nAnswer: 9", eos=True)
    assert len(ids) == 24
    ends = split_steps(ids, chars, StepsConfig())
    assert ends == [7, 14, 24]  # just after each "\n"; the last step carries the eos
    assert step_texts(ids, ends, chars) == ["7+5=12\n", "12-3=9\n", "Answer: 9"]
    assert ids[-1] == chars.eos_token_id


def test_prefixes_are_token_exact(chars):
    prompt = enc(chars, "Q: 7,+5,-3\n")
    ids = enc(chars, "7+5=12\n12-3=9\nAnswer: 9", eos=True)
    ends = split_steps(ids, chars, StepsConfig())
    traj = Trajectory(prompt_ids=prompt, completion_ids=ids, reward=1.0, step_ends=ends)
    assert traj.n_steps == 3
    assert traj.prefix_ids(0) == prompt
    assert traj.prefix_ids(1) == prompt + ids[:7]
    assert traj.prefix_ids(2) == prompt + ids[:14]
    assert traj.prefix_ids(3) == prompt + ids  # the whole trajectory, eos included


def test_token_char_ends_char_tokenizer(chars):
    ids = enc(chars, "ab\nc", eos=True)
    assert token_char_ends(ids, chars) == ("ab\nc", [1, 2, 3, 4, 4])  # eos decodes to nothing


# --- a tokenizer with multi-character tokens ------------------------------------------------------

def test_multichar_token_boundary_after_token(words):
    ids = enc(words, "The sum is 5.\n\nSo x.\nDone\n\n\nEnd!", eos=True)
    assert words.convert_ids_to_tokens(ids) == ["The", " sum", " is", " 5", ".\n\n", "So", " x", ".\n", "Done",
                                                "\n\n", "\n", "End", "!", "<eos>"]
    ends = split_steps(ids, words, StepsConfig(delimiters=PAPER))
    # After the ".\n\n" token (5), after ".\n" (8), after the "\n\n"+"\n" run (11, one boundary), end (14).
    assert ends == [5, 8, 11, 14]
    assert step_texts(ids, ends, words) == ["The sum is 5.\n\n", "So x.\n", "Done\n\n\n", "End!"]


def test_delimiter_inside_a_token_ends_the_step_after_that_token(words):
    ids = enc(words, "Done\nNext!")
    assert words.convert_ids_to_tokens(ids) == ["Done", "\nNext", "!"]
    ends = split_steps(ids, words, StepsConfig(delimiters=PAPER))
    assert ends == [2, 3]
    assert step_texts(ids, ends, words) == ["Done\nNext", "!"]


def test_non_canonical_sampled_tokens_are_kept(words):
    # The policy sampled "." and "\n\n" separately; canonical tokenization would merge them into ".\n\n".
    ids = words.convert_tokens_to_ids(["The", " sum", ".", "\n\n", "So", "!"])
    ends = split_steps(ids, words, StepsConfig(delimiters=PAPER))
    assert ends == [4, 6]
    traj = Trajectory(prompt_ids=[], completion_ids=ids, reward=0.0, step_ends=ends)
    assert traj.prefix_ids(1) == ids[:4]
    assert enc(words, words.decode(ids[:4])) != ids[:4]  # re-tokenizing the text would have drifted


def test_delimiter_ends_longest_wins_and_runs():
    assert delimiter_ends("a.\n\nb", PAPER) == [4]
    assert delimiter_ends("a.\n\nb", [".\n", ".\n\n"]) == [4]  # not 3 then 4
    assert delimiter_ends("a.\nb", PAPER) == [3]
    assert delimiter_ends("a\n\n\n\nb\nc", ["\n"]) == [5, 7]  # a run of newlines is one boundary
    assert delimiter_ends("a.b", PAPER) == []
    assert delimiter_ends("a\n", ["\n"]) == [2]


def test_trailing_delimiter_makes_no_empty_step(chars):
    ids = enc(chars, "12\n9\n", eos=True)
    ends = split_steps(ids, chars, StepsConfig())
    assert ends == [3, 6]  # the eos stays with the last step instead of forming an empty one
    assert step_texts(ids, ends, chars) == ["12\n", "9\n"]


# --- merging and caps -----------------------------------------------------------------------------

def test_min_tokens_merges_short_steps(chars):
    ids = enc(chars, "1\n22\n333\n2222\n5")  # raw steps of 2, 3, 4, 5, 1 tokens
    assert split_steps(ids, chars, StepsConfig(min_tokens=1)) == [2, 5, 9, 14, 15]
    ends = split_steps(ids, chars, StepsConfig(min_tokens=3))
    # "1\n" (2 < 3) merges into the next step; the short last step "5" merges into the previous one.
    assert ends == [5, 9, 15]
    assert step_texts(ids, ends, chars) == ["1\n22\n", "333\n", "2222\n5"]


def test_min_tokens_larger_than_completion_gives_one_step(chars):
    ids = enc(chars, "1\n2\n3")
    assert split_steps(ids, chars, StepsConfig(min_tokens=50)) == [5]


def test_max_steps_merges_tail_into_last(chars):
    ids = enc(chars, "a\nb\nc\nd\ne")
    assert split_steps(ids, chars, StepsConfig()) == [2, 4, 6, 8, 9]
    ends = split_steps(ids, chars, StepsConfig(max_steps=3))
    assert len(ends) == 3 and ends == [2, 4, 9]
    assert step_texts(ids, ends, chars) == ["a\n", "b\n", "c\nd\ne"]
    assert split_steps(ids, chars, StepsConfig(max_steps=1)) == [9]


def test_no_delimiter_is_one_step_and_empty_is_none(chars):
    ids = enc(chars, "Answer: 9", eos=True)
    assert split_steps(ids, chars, StepsConfig(delimiters=PAPER)) == [10]
    assert split_steps([], chars, StepsConfig()) == []
    assert step_texts([], [], chars) == []


# --- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(delimiters=[]), dict(delimiters=["\n", ""]), dict(min_tokens=0),
                                    dict(max_steps=0), dict(overflow="spread")])
def test_bad_steps_config(kwargs):
    with pytest.raises(ConfigError, match="bad config gpo.steps"):
        StepsConfig(**kwargs)


# --- the paper's rule on long chains (hub benchmarks: min 30 tokens, at most 30 steps, balanced) -----
PAPER_STEPS = StepsConfig(delimiters=PAPER, min_tokens=30, max_steps=30, overflow="balance")


def _chain(tok: PreTrainedTokenizerFast, n_paragraphs: int, length=lambda i: 40) -> list[int]:
    """n paragraphs separated by blank lines; paragraph i has length(i) characters (= tokens here)."""
    paras = ["a" * (length(i) - 1) + "." for i in range(n_paragraphs)]
    return enc(tok, "\n\n".join(paras), eos=True)


@pytest.fixture(scope="module")
def para_chars() -> PreTrainedTokenizerFast:
    return char_tokenizer(["a.\n b"])


def test_paper_rule_five_paragraphs_keeps_each_paragraph(para_chars):
    ids = _chain(para_chars, 5)
    ends = split_steps(ids, para_chars, PAPER_STEPS)
    assert ends == [42, 84, 126, 168, len(ids)]  # 40 chars + "\n\n" per paragraph, the last with eos
    assert all(t.endswith(".\n\n") for t in step_texts(ids, ends, para_chars)[:-1])


def test_paper_rule_thirty_paragraphs_are_thirty_steps(para_chars):
    ids = _chain(para_chars, 30)
    ends = split_steps(ids, para_chars, PAPER_STEPS)
    assert len(ends) == 30 and ends == [42 * (i + 1) for i in range(29)] + [len(ids)]


def test_paper_rule_merges_short_paragraphs_first(para_chars):
    ids = _chain(para_chars, 12, length=lambda i: 10)  # 12 steps of 12 tokens: merged until >= 30
    ends = split_steps(ids, para_chars, PAPER_STEPS)
    spans = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    assert ends == [36, 72, 108, len(ids)] and min(spans) >= 30


def test_paper_rule_two_hundred_paragraphs_balance_into_thirty_spans(para_chars):
    ids = _chain(para_chars, 200)
    ends = split_steps(ids, para_chars, PAPER_STEPS)
    spans = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    assert len(ends) == 30 and ends[-1] == len(ids)
    # 200 / 30 = 6.67 paragraphs per span: every span holds 6 or 7 whole paragraphs (42 tokens each),
    # never the old rule's 29 single paragraphs plus a 171-paragraph tail.
    assert {round(s / 42) for s in spans} <= {6, 7} and max(spans) - min(spans) <= 43
    texts = step_texts(ids, ends, para_chars)
    assert all(t.endswith(".\n\n") for t in texts[:-1])  # spans still end at delimiters
    old = split_steps(ids, para_chars, StepsConfig(delimiters=PAPER, min_tokens=30, max_steps=30))
    assert len(old) == 30 and old[-1] - old[-2] > 100 * 42  # the tail rule: everything after step 29 in one


def test_paper_rule_balances_uneven_paragraphs(para_chars):
    ids = _chain(para_chars, 200, length=lambda i: 35 if i % 3 else 120)  # long and short paragraphs
    ends = split_steps(ids, para_chars, PAPER_STEPS)
    spans = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    assert len(ends) == 30
    assert max(spans) <= 1.5 * len(ids) / 30  # within half a mean span of even


def test_tiny_arith_default_segmentation_is_unchanged():
    from gpo_exp.benchmarks import get

    cfg = get("arith").cfg.steps
    assert (cfg.delimiters, cfg.min_tokens, cfg.max_steps, cfg.overflow) == (["\n"], 1, 30, "tail")
    for name in ("gsm8k", "math500", "math", "bbh", "aime24", "aime25", "date"):
        s = get(name, data_files="unused.jsonl").cfg.steps
        assert (s.delimiters, s.min_tokens, s.max_steps, s.overflow) == (PAPER, 30, 30, "balance"), name
