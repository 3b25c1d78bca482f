"""MMLU and MMLU-Pro: lettered multiple choice, from the hub or local files in the hub's columns.

    mmlu      cais/mmlu, config "all": question, subject, choices (4 strings), answer (index 0-3);
              splits test 14042 / validation 1531 / dev 285 (the 5-shot exemplars)
    mmlu_pro  TIGER-Lab/MMLU-Pro: question, options (up to 10 strings), answer (letter), answer_index,
              category, src; splits test 12032 / validation 70

The prompt lists the options as (A) ... (J) and asks for the reasoning, one step per line, ending with
"The answer is (X)" (MMLU-Pro's chain-of-thought format). Grading accepts the gold letter in the usual
forms ("The answer is (B)", "Answer: B", "\\boxed{B}", a last line "(B)") or the gold option's text
after "answer is" or in \\boxed{}; anything else, another letter included, scores 0.

A row whose answer is not among its options (an index past the list, a letter past the options, or a
letter and index that disagree) stops loading with one line naming the row: a broken file is found at
once, not read as a lower score. `subjects` (mmlu) and `categories` (mmlu_pro) select rows; a filter
that matches nothing is one line listing what the split holds. `group_of(row)` gives the subject or
category, which gpo_exp.eval reports as a breakdown.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gpo_exp.benchmarks.base import BENCHMARKS, StepsConfig
from gpo_exp.benchmarks.graders import extract_boxed, extract_choice, extract_final, normalize_text
from gpo_exp.benchmarks.hub import HubBenchmark, HubConfig, _default, paper_steps
from gpo_exp.registry import ConfigError, check

LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has up to 10 options
MC_TEMPLATE = ("The following is a multiple choice question{about}. Think step by step and write one step per line. "
               "Finish with \"The answer is (X)\" where X is the letter of the correct option.\n\n"
               "Question: {question}\nOptions:\n{options}\nAnswer:\n")


def _short(text: Any) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= 60 else t[:57] + "..."


def options_block(options: list[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def score_letter(completion: str, letter: str, option_text: str | None) -> float:
    """1.0 when the completion's answer is option `letter` (by letter, or by the option's text), else 0.0."""
    try:
        picked = extract_choice(completion)
        if picked is not None:
            return float(picked == letter)
        if not option_text:
            return 0.0
        gold = normalize_text(option_text)
        final = extract_final(completion)
        boxed = extract_boxed(completion)
        return float((final is not None and final == gold) or (boxed is not None and normalize_text(boxed) == gold))
    except Exception:  # noqa: BLE001 -- a grader never raises
        return 0.0


@dataclass
class ChoiceConfig(HubConfig):
    """Fields shared by mmlu and mmlu_pro."""

    derived_fraction: float = 0.0  # evaluation sets: nothing carved from test
    donor: str = "test"  # a single local file is the test split
    prompt_suffix: Optional[str] = None  # null: the step-by-step template | a string: question, options, then it (e.g. a reasoning model's instruction)
    max_new_tokens: int = 512  # a few lines of reasoning and the letter
    steps: StepsConfig = paper_steps()  # the paper: newline steps of >= 30 tokens, <= 30 steps


def _names_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v))


@dataclass
class MmluConfig(ChoiceConfig):
    name: str = "mmlu"  # registry name
    hub_id: str = "cais/mmlu"  # 57 subjects; config "all" holds them all, with a `subject` column
    hub_config: Optional[str] = "all"  # one subject's config name (e.g. "anatomy") loads only it
    columns: dict[str, str] = _default({"prompt": "question", "answer": "answer", "choices": "choices",
                                        "subject": "subject"})  # ours -> dataset column
    split_map: dict[str, str] = _default({"train": "dev", "val": "validation", "test": "test"})  # ours -> hub's
    subjects: Optional[list[str]] = None  # keep only rows of these subjects (e.g. [anatomy, virology]); null: all

    def __post_init__(self) -> None:
        super().__post_init__()
        check(_names_or_none(self.subjects), "benchmark.subjects", self.subjects, "a non-empty list of names, or null")


class MultipleChoice(HubBenchmark):
    """Shared by mmlu and mmlu_pro: rows carry `options`, `answer` (a letter), `answer_text` and a group."""

    cfg: ChoiceConfig
    group_field = ""  # the row field that the filter and the breakdown use (subject | category)
    filter_key = ""  # the config field that filters it (subjects | categories)
    required = ("prompt", "answer")

    def _options(self, raw: dict[str, Any]) -> Any:
        v = raw.get(self.cfg.columns.get("options", "options"))
        return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        question, options = raw.get(self.cfg.columns["prompt"]), self._options(raw)
        if not isinstance(question, str) or not isinstance(options, list) or not options:
            return {"prompt": question, "answer": None}  # malformed: skipped and counted by load
        options = [str(o) for o in options]
        if len(options) > len(LETTERS):
            raise ConfigError(f"benchmark {self.name}: row {_short(question)!r} has {len(options)} options; at most "
                              f"{len(LETTERS)} ({LETTERS[0]}-{LETTERS[-1]}) are supported")
        gold = self.gold_index(raw, options)
        group = raw.get(self.cfg.columns.get(self.group_field, self.group_field))
        return {"prompt": question, "options": options, "answer": LETTERS[gold], "answer_text": options[gold],
                self.group_field: str(group) if group is not None else None}

    def _not_an_option(self, raw: dict[str, Any], gold: Any, options: list[str]) -> ConfigError:
        return ConfigError(f"benchmark {self.name}: the answer {gold!r} of row "
                           f"{_short(raw.get(self.cfg.columns['prompt']))!r} is not among its {len(options)} options "
                           f"({LETTERS[0]}-{LETTERS[len(options) - 1]}, index 0-{len(options) - 1}); fix the row")

    def load(self, split: str) -> list[dict[str, Any]]:
        rows = super().load(split)
        wanted = getattr(self.cfg, self.filter_key)
        if wanted is None:
            return rows
        kept = [r for r in rows if r.get(self.group_field) in set(wanted)]
        if not kept:
            have = sorted({str(r.get(self.group_field)) for r in rows})
            more = f" (+{len(have) - 12} more)" if len(have) > 12 else ""
            raise ConfigError(f"bad config benchmark.{self.filter_key}={wanted}: no {split} row of {self.name} has "
                              f"such a {self.group_field}; its {self.filter_key}: {', '.join(have[:12])}{more}")
        return kept

    def prompt(self, row: dict[str, Any]) -> str:
        if self.cfg.prompt_suffix is not None:
            return f"{row['prompt']}\n{options_block(row['options'])}\n{self.cfg.prompt_suffix}"
        group = row.get(self.group_field)
        about = f" about {str(group).replace('_', ' ')}" if group else ""
        return MC_TEMPLATE.format(about=about, question=row["prompt"], options=options_block(row["options"]))

    def score(self, completion: str, row: dict[str, Any]) -> float:
        return score_letter(completion, row["answer"], row.get("answer_text"))

    def final_answer(self, completion: str) -> str | None:
        """The letter (maj@k votes on it), else the text after 'answer is'."""
        return extract_choice(completion) or extract_final(completion)

    def group_of(self, row: dict[str, Any]) -> str | None:
        return row.get(self.group_field)

    def gold_index(self, raw: dict[str, Any], options: list[str]) -> int:
        """Index of the gold option; ConfigError (one line) when the answer is not among the options."""
        raise NotImplementedError


@BENCHMARKS.register("mmlu", MmluConfig)
class Mmlu(MultipleChoice):
    name = "mmlu"
    cfg: MmluConfig
    group_field, filter_key = "subject", "subjects"

    def _options(self, raw: dict[str, Any]) -> Any:
        v = raw.get(self.cfg.columns.get("choices", "choices"))
        return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v

    def gold_index(self, raw: dict[str, Any], options: list[str]) -> int:
        gold = raw.get(self.cfg.columns["answer"])
        if isinstance(gold, str) and gold.strip().isdigit():
            gold = int(gold)
        if isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip().upper() in LETTERS:
            gold = LETTERS.index(gold.strip().upper())  # some copies store the letter
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise self._not_an_option(raw, gold, options)
        return gold


@dataclass
class MmluProConfig(ChoiceConfig):
    name: str = "mmlu_pro"  # registry name
    hub_id: str = "TIGER-Lab/MMLU-Pro"  # 14 categories, up to 10 options per question
    hub_config: Optional[str] = None  # the dataset has one config
    columns: dict[str, str] = _default({"prompt": "question", "answer": "answer", "answer_index": "answer_index",
                                        "options": "options", "category": "category"})  # ours -> dataset column
    split_map: dict[str, str] = _default({"val": "validation", "test": "test"})  # ours -> hub's (no train split)
    categories: Optional[list[str]] = None  # keep only rows of these categories (e.g. [math, law]); null: all
    max_new_tokens: int = 1024  # its questions need longer reasoning than MMLU's

    def __post_init__(self) -> None:
        super().__post_init__()
        check(_names_or_none(self.categories), "benchmark.categories", self.categories,
              "a non-empty list of names, or null")


@BENCHMARKS.register("mmlu_pro", MmluProConfig)
class MmluPro(MultipleChoice):
    name = "mmlu_pro"
    cfg: MmluProConfig
    group_field, filter_key = "category", "categories"

    def gold_index(self, raw: dict[str, Any], options: list[str]) -> int:
        letter = raw.get(self.cfg.columns["answer"])
        index = raw.get(self.cfg.columns.get("answer_index", "answer_index"))
        by_letter = (LETTERS.index(letter.strip().upper()) if isinstance(letter, str) and len(letter.strip()) == 1
                     and letter.strip().upper() in LETTERS else None)
        by_index = index if isinstance(index, int) and not isinstance(index, bool) else None
        gold = by_letter if by_letter is not None else by_index
        if (gold is None or not 0 <= gold < len(options)
                or (by_letter is not None and by_index is not None and by_letter != by_index)):
            raise self._not_an_option(raw, letter if by_index is None else f"{letter} (index {index})", options)
        return gold
