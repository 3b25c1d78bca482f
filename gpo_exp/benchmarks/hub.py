"""Benchmarks backed by Hugging Face datasets: gsm8k, math500, bbh, aime24, aime25, date.

Rows come from `datasets.load_dataset(hub_id, hub_config)` when the hub is reachable, or from local
files with the same columns (`benchmark.data_files=...`: json, jsonl or parquet, by extension).
Without a network a hub benchmark fails at once with a one-line ConfigError that names
`benchmark.data_files`; it never waits on download retries.

Splits. `split_map` names the hub split that backs each of our splits (train/val/test). A split the
source lacks is carved out of the `donor` split: each missing split takes `derived_fraction` of the
donor's rows (a shuffle seeded by `benchmark.seed`), and the donor keeps the rest, so the three
splits never share a row. E.g. gsm8k's val is 5% of the hub's train; MATH-500 only has test, so
train and val are 10% of it each and test is the other 400 problems. `derived_fraction=0` carves
nothing and leaves missing splits empty (loading one then fails), which is the AIME default:
30 problems are an evaluation set. Local files: a path or list of paths is the donor split; a
mapping {train|val|test: path(s)} gives splits explicitly, missing ones carved the same way.

`columns` maps our row fields to dataset columns: `prompt` (question text) and `answer` (gold),
plus optional extras (`solution`, `task`, ...). A row missing a required column is passed on with
answer None, so `Benchmark.load` skips and counts it.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import random
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gpo_exp.benchmarks.base import BENCHMARKS, SPLITS, Benchmark, BenchmarkConfig, StepsConfig
from gpo_exp.benchmarks.graders import (extract_boxed, extract_choice, extract_final, extract_gsm8k, grade_math,
                                        grade_number, math_equal, normalize_text, number_str, score_gsm8k)
from gpo_exp.registry import ConfigError, check

PROBE_TIMEOUT_S = 3.0  # how long the reachability probe may take before the hub counts as offline
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations: '48/2 = <<48/2=24>>24'
_LETTERS = "ABCDEFGHIJKLMNOPQR"

STEP_INSTRUCTION = "Think step by step and write one step per line."
# Appended to each MATH problem by `math` (and by math500/aime with benchmark.prompt_suffix set). The GPO
# paper's exact wording was not found in its text; this is DeepSeek-R1's recommended instruction for
# math (its model card), which the paper's model was tuned on.
PAPER_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_TEMPLATE = ("Solve the problem. " + STEP_INSTRUCTION + " Put the final answer in \\boxed{{}}.\n\n"
                 "Problem: {question}\nSolution:\n")
GSM_TEMPLATE = ("Solve the math word problem. " + STEP_INSTRUCTION + " On the last line write the final "
                "answer as \"#### <number>\".\n\nQuestion: {question}\nAnswer:\n")
CHOICE_TEMPLATE = ("{question}\n\n" + STEP_INSTRUCTION + " End with \"So the answer is (X).\" where X is the "
                   "letter of the correct option.\nAnswer:\n")
FREE_TEMPLATE = "{question}\n\n" + STEP_INSTRUCTION + " End with \"So the answer is <answer>.\"\nAnswer:\n"

# BBH tasks whose gold is an option letter '(A)'. Default selection for `bbh` (13 tasks). We could
# not find which 13 tasks the GPO paper used, so these are 13 of BBH's 18 multiple-choice tasks:
# date_understanding is left out (it is the `date` benchmark), as are the 5- and 7-object
# variants of logical_deduction / tracking_shuffled_objects where a 3-object variant is kept
# (logical_deduction_five_objects is kept to include one harder variant).
BBH_TASKS = [
    "disambiguation_qa", "geometric_shapes", "hyperbaton", "logical_deduction_three_objects",
    "logical_deduction_five_objects", "movie_recommendation", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "temporal_sequences", "tracking_shuffled_objects_three_objects",
]


# --- hub reachability ---------------------------------------------------------------------------
def hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now (offline env var or unreachable host), else None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = proxy or endpoint  # behind a proxy only the proxy must be reachable
    if not _reachable(target, PROBE_TIMEOUT_S):
        return f"{urllib.parse.urlparse(target).hostname} not reachable within {PROBE_TIMEOUT_S:g}s"
    return None


@functools.lru_cache(maxsize=8)
def _reachable(url: str, timeout: float) -> bool:
    """TCP connect to url's host in a daemon thread; DNS can hang past socket timeouts, join() cannot."""
    parts = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


# --- local files --------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .json / .jsonl / .parquet file. Unparsable jsonl lines become {} (counted as malformed)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"bad config benchmark.data_files: no such file {str(path)!r}")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if suffix not in (".json", ".jsonl"):
        raise ConfigError(f"bad config benchmark.data_files={str(path)!r}: must end in .json, .jsonl or .parquet")
    text = p.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # many '.json' files are really JSON lines
        if isinstance(obj, dict):  # e.g. BBH's own files: {"examples": [...]}
            obj = next((obj[k] for k in ("examples", "data", "rows") if isinstance(obj.get(k), list)), None)
            if obj is None:
                raise ConfigError(f"bad config benchmark.data_files={str(path)!r}: a .json file must hold a list "
                                  "of rows or {\"examples\"|\"data\"|\"rows\": [...]}")
        if isinstance(obj, list):
            return [r if isinstance(r, dict) else {} for r in obj]
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = {}
            rows.append(r if isinstance(r, dict) else {})
    return rows


def _paths(v: Any) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _valid_data_files(v: Any) -> bool:
    def paths_ok(x: Any) -> bool:
        return isinstance(x, str) or (isinstance(x, list) and len(x) > 0 and all(isinstance(p, str) for p in x))

    if v is None or paths_ok(v):
        return True
    return isinstance(v, dict) and len(v) > 0 and set(v) <= set(SPLITS) and all(paths_ok(x) for x in v.values())


# --- splits -------------------------------------------------------------------------------------
def derive_splits(sources: dict[str, list[Any]], donor: str, fraction: float, seed: int) -> dict[str, list[Any]]:
    """Fill splits missing from `sources` with disjoint seeded slices of the donor split (see module doc)."""
    out = {s: list(rows) for s, rows in sources.items()}
    missing = [s for s in SPLITS if s not in out]
    pool = out.get(donor, [])
    if not missing or not pool or fraction <= 0:
        return out
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    n = int(round(fraction * len(pool)))
    for k, s in enumerate(missing):
        out[s] = [pool[i] for i in sorted(order[k * n : (k + 1) * n])]
    out[donor] = [pool[i] for i in sorted(order[len(missing) * n :])]
    return out


def _answer_str(v: Any) -> str | None:
    """A gold answer as a non-empty string; numbers are canonicalised (AIME stores ints), lists rejected."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return number_str(v)
    return (v.strip() or None) if isinstance(v, str) else None


def _default(value: Any) -> Any:
    """A dataclass field defaulting to a fresh copy of `value` (dicts and lists must not be shared)."""
    return field(default_factory=lambda: copy.deepcopy(value))


PAPER_DELIMITERS = ["\n", "\n\n", ".\n", ".\n\n"]  # the paper's code


def paper_steps() -> Any:
    """The paper's segmentation (default of every hub benchmark): newline delimiters, steps under 30
    tokens merged, at most 30 steps, a longer chain merged into 30 spans of similar length."""
    return field(default_factory=lambda: StepsConfig(delimiters=list(PAPER_DELIMITERS), min_tokens=30, max_steps=30,
                                                     overflow="balance"))


# --- the family ---------------------------------------------------------------------------------
@dataclass
class HubConfig(BenchmarkConfig):
    hub_id: str = ""  # Hugging Face dataset id, read with datasets.load_dataset when online
    hub_config: Optional[str] = None  # dataset config (subset) name, e.g. "main" for openai/gsm8k
    data_files: Any = None  # local .json/.jsonl/.parquet instead of the hub: path, list, or {train|val|test: path(s)}
    columns: dict[str, str] = _default({"prompt": "question", "answer": "answer"})  # our field -> dataset column
    split_map: dict[str, str] = _default({"train": "train", "val": "validation", "test": "test"})  # ours -> hub's
    donor: str = "train"  # split that missing splits are carved from (and what a single data_files path holds)
    derived_fraction: float = 0.1  # share of the donor each missing split gets (seeded); 0 = leave them empty

    def __post_init__(self) -> None:
        check(bool(self.hub_id) or self.data_files is not None, "benchmark.hub_id", self.hub_id,
              "a Hugging Face dataset id (or set benchmark.data_files)")
        check(_valid_data_files(self.data_files), "benchmark.data_files", self.data_files,
              "a path, a list of paths, or {train|val|test: path(s)} of .json/.jsonl/.parquet files")
        check("prompt" in self.columns, "benchmark.columns", self.columns, "a mapping with at least a 'prompt' entry")
        check(set(self.split_map) <= set(SPLITS), "benchmark.split_map", self.split_map,
              f"keys among {', '.join(SPLITS)}")
        check(self.donor in SPLITS, "benchmark.donor", self.donor, f"one of {', '.join(SPLITS)}")
        check(0.0 <= self.derived_fraction < 0.5, "benchmark.derived_fraction", self.derived_fraction, "in [0, 0.5)")


class HubBenchmark(Benchmark):
    """Shared loading for hub datasets; subclasses convert rows, build prompts and score."""

    cfg: HubConfig
    required = ("prompt", "answer")  # fields a row needs (others in `columns` are optional)

    def __init__(self, cfg: HubConfig) -> None:
        super().__init__(cfg)
        self._splits: dict[str, list[dict[str, Any]]] | None = None

    # -- loading --
    def _load(self, split: str) -> list[dict[str, Any]]:
        if self._splits is None:
            sources = self._read_files() if self.cfg.data_files is not None else self._read_hub()
            self._splits = derive_splits(sources, self.cfg.donor, self.cfg.derived_fraction, self.cfg.seed)
        return [self.convert(raw) for raw in self._splits.get(split, [])]

    def _read_files(self) -> dict[str, list[dict[str, Any]]]:
        df = self.cfg.data_files
        spec = df if isinstance(df, dict) else {self.cfg.donor: df}
        return {s: [r for p in _paths(v) for r in read_records(p)] for s, v in spec.items()}

    def _require_hub(self) -> None:
        reason = hub_offline_reason()
        if reason:
            cols = ", ".join(sorted(set(self.cfg.columns.values())))
            raise ConfigError(f"benchmark {self.name}: Hugging Face hub unavailable ({reason}); set "
                              f"benchmark.data_files=<.jsonl|.json|.parquet path(s)> with columns {cols}")

    def _hub_splits(self, config: str | None) -> dict[str, list[dict[str, Any]]]:
        """Our splits -> rows of dataset `hub_id`/`config` (splits the hub lacks are left out)."""
        self._require_hub()
        try:
            from datasets import load_dataset

            ds = load_dataset(self.cfg.hub_id, config)
        except Exception as e:  # noqa: BLE001 -- any failure becomes one actionable line
            msg = (str(e).splitlines() or [""])[0][:200]
            raise ConfigError(f"benchmark {self.name}: load_dataset({self.cfg.hub_id!r}, {config!r}) failed "
                              f"({type(e).__name__}: {msg}); set benchmark.data_files to local files") from None
        return {ours: ds[theirs].to_list() for ours, theirs in self.cfg.split_map.items() if theirs in ds}

    def _read_hub(self) -> dict[str, list[dict[str, Any]]]:
        return self._hub_splits(self.cfg.hub_config)

    # -- rows --
    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Dataset record -> row via `columns`; a missing required column leaves that field None."""
        row = {k: raw.get(col) for k, col in self.cfg.columns.items() if col in raw or k in self.required}
        row["answer"] = _answer_str(row.get("answer"))
        return row


# --- math word problems -------------------------------------------------------------------------
@dataclass
class Gsm8kConfig(HubConfig):
    name: str = "gsm8k"  # registry name
    hub_id: str = "openai/gsm8k"  # 7473 train / 1319 test; val is carved from train
    hub_config: Optional[str] = "main"  # "main" (the "socratic" config phrases steps as questions)
    columns: dict[str, str] = _default({"prompt": "question", "solution": "answer"})  # gold = the solution's '#### N'
    derived_fraction: float = 0.05  # val = 5% of train (374 problems)
    max_new_tokens: int = 320  # gold solutions are < 200 tokens
    steps: StepsConfig = paper_steps()  # the paper: newline steps of >= 30 tokens, <= 30 steps


@BENCHMARKS.register("gsm8k", Gsm8kConfig)
class Gsm8k(HubBenchmark):
    name = "gsm8k"

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        row = super().convert(raw)
        sol = row.get("solution")
        if isinstance(sol, str):
            row["solution"] = _CALC.sub("", sol).strip()  # the model should not learn calculator markup
            if row["answer"] is None or "answer" not in self.cfg.columns:
                row["answer"] = extract_gsm8k(sol)  # None when the solution has no '#### N': skipped
        return row

    def prompt(self, row: dict[str, Any]) -> str:
        return GSM_TEMPLATE.format(question=row["prompt"])

    def score(self, completion: str, row: dict[str, Any]) -> float:
        return score_gsm8k(completion, row["answer"])

    def final_answer(self, completion: str) -> str | None:
        """The number score_gsm8k grades: '#### N', else 'answer is N', else the last \\boxed{}."""
        return extract_gsm8k(completion) or extract_boxed(completion)

    def same_answer(self, a: str, b: str) -> bool:
        return grade_number(a, b)


@dataclass
class MathConfig(HubConfig):
    name: str = "math500"  # registry name
    hub_id: str = "HuggingFaceH4/MATH-500"  # 500 MATH test problems, split "test" only
    columns: dict[str, str] = _default({"prompt": "problem", "answer": "answer", "solution": "solution",
                                        "level": "level", "subject": "subject", "unique_id": "unique_id"})  # -> column
    split_map: dict[str, str] = _default({"test": "test"})  # the hub has test only
    donor: str = "test"  # train and val are carved from test (50 each; test keeps 400)
    derived_fraction: float = 0.1  # 0 keeps all 500 for test (train/val then empty)
    max_new_tokens: int = 1024  # MATH solutions run to several hundred tokens
    steps: StepsConfig = paper_steps()  # the paper: newline steps of >= 30 tokens, <= 30 steps
    prompt_suffix: Optional[str] = None  # null: MATH_TEMPLATE (one step per line) | a string: the problem, a newline, then it (the reasoning presets' protocol, e.g. PAPER_SUFFIX)


@BENCHMARKS.register("math500", MathConfig)
class Math500(HubBenchmark):
    name = "math500"
    cfg: MathConfig

    def prompt(self, row: dict[str, Any]) -> str:
        if self.cfg.prompt_suffix is not None:
            return f"{row['prompt']}\n{self.cfg.prompt_suffix}"
        return MATH_TEMPLATE.format(question=row["prompt"])

    def score(self, completion: str, row: dict[str, Any]) -> float:
        """math-verify equivalence of the completion's \\boxed{} answer with the gold LaTeX answer."""
        return float(grade_math(completion, row["answer"]))

    def final_answer(self, completion: str) -> str | None:
        """The last \\boxed{} answer (else the last number): voted on by math-verify equivalence."""
        return extract_boxed(completion) or super().final_answer(completion)

    def same_answer(self, a: str, b: str) -> bool:
        return math_equal(a, b)

    def group_of(self, row: dict[str, Any]) -> str | None:
        return row.get("subject")


def problem_key(text: Any) -> str:
    """A problem's text with whitespace collapsed: what decontamination compares."""
    return " ".join(str(text).split())


@dataclass
class MathTrainConfig(MathConfig):
    name: str = "math"  # registry name
    hub_id: str = "DigitalLearningGmbH/MATH-lighteval"  # parquet copy of MATH (Hendrycks et al.): 7500 train / 5000 test, columns problem, level, type, solution
    columns: dict[str, str] = _default({"prompt": "problem", "answer": "answer", "solution": "solution",
                                        "level": "level", "subject": "type"})  # gold: `answer`, else the solution's last \boxed{}
    split_map: dict[str, str] = _default({"train": "train"})  # training prompts; test is MATH-500 (test_hub_id)
    donor: str = "train"  # val is carved from train
    derived_fraction: float = 0.02  # val = 2% of train (150 problems)
    test_hub_id: str = "HuggingFaceH4/MATH-500"  # our test split: MATH-500; its problems are removed from train and val
    test_data_files: Any = None  # local MATH-500 file(s) (columns problem, answer) instead of test_hub_id
    prompt_suffix: Optional[str] = PAPER_SUFFIX  # appended to every problem: asks for the reasoning and a \boxed{} answer

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.test_hub_id) or self.test_data_files is not None, "benchmark.test_hub_id", self.test_hub_id,
              "a dataset id of the test problems (MATH-500), or set benchmark.test_data_files")
        check(_valid_data_files(self.test_data_files) and not isinstance(self.test_data_files, dict),
              "benchmark.test_data_files", self.test_data_files, "a path or list of .json/.jsonl/.parquet paths")


@BENCHMARKS.register("math", MathTrainConfig)
class MathTrain(Math500):
    """MATH's train split for training, MATH-500 for test, with every MATH-500 problem removed from train/val
    (MATH-500 is drawn from MATH's test split; a file that also holds test problems is decontaminated)."""

    name = "math"
    cfg: MathTrainConfig

    def __init__(self, cfg: MathTrainConfig) -> None:
        super().__init__(cfg)
        self.removed = 0  # train/val rows dropped because their problem is a test problem

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        row = super().convert(raw)
        if row.get("answer") is None and isinstance(row.get("solution"), str):
            row["answer"] = extract_boxed(row["solution"])  # MATH's own files keep the gold in the solution
        return row

    def _load(self, split: str) -> list[dict[str, Any]]:
        if self._splits is None:
            test_cfg = {"name": "math500", "hub_id": self.cfg.test_hub_id or "unused", "data_files":
                        self.cfg.test_data_files, "derived_fraction": 0.0, "prompt_suffix": self.cfg.prompt_suffix}
            try:
                test = [r for r in BENCHMARKS.build(test_cfg)._load("test") if isinstance(r.get("prompt"), str)]
            except ConfigError as e:
                raise ConfigError(f"benchmark math: test split {self.cfg.test_hub_id!r} unavailable ({e}); set "
                                  "benchmark.test_data_files=<MATH-500 .jsonl|.parquet>") from None
            banned = {problem_key(r["prompt"]) for r in test}
            sources = self._read_files() if self.cfg.data_files is not None else self._read_hub()
            sources.pop("test", None)  # test is MATH-500 alone
            col = self.cfg.columns["prompt"]
            kept = {s: [r for r in rows if problem_key(r.get(col, "")) not in banned] for s, rows in sources.items()}
            self.removed = sum(len(rows) for rows in sources.values()) - sum(len(rows) for rows in kept.values())
            splits = derive_splits({**kept, "test": []}, self.cfg.donor, self.cfg.derived_fraction, self.cfg.seed)
            splits.update({s: [] for s in ("train", "val") if s not in splits})
            self._splits = {s: [self.convert(r) for r in rows] for s, rows in splits.items() if s != "test"}
            self._splits["test"] = test
        return list(self._splits.get(split, []))


@dataclass
class Aime24Config(MathConfig):
    name: str = "aime24"  # registry name
    hub_id: str = "HuggingFaceH4/aime_2024"  # 30 problems (AIME 2024 I and II), published as split "train"
    columns: dict[str, str] = _default({"prompt": "problem", "answer": "answer", "solution": "solution"})  # -> column
    split_map: dict[str, str] = _default({"test": "train"})  # the hub's only split is our test
    derived_fraction: float = 0.0  # evaluation only: train/val stay empty
    max_new_tokens: int = 2048  # competition problems need long reasoning


@dataclass
class Aime25Config(Aime24Config):
    name: str = "aime25"  # registry name
    hub_id: str = "math-ai/aime25"  # 30 problems (AIME 2025 I and II), split "test"
    columns: dict[str, str] = _default({"prompt": "problem", "answer": "answer"})  # our field -> column
    split_map: dict[str, str] = _default({"test": "test"})  # the hub's only split


@BENCHMARKS.register("aime24", Aime24Config)
class Aime24(Math500):
    name = "aime24"


@BENCHMARKS.register("aime25", Aime25Config)
class Aime25(Math500):
    name = "aime25"


# --- multiple choice ----------------------------------------------------------------------------
def score_choice(completion: str, gold: str, gold_text: str | None = None) -> float:
    """1.0 when the completion picks option `gold` (a letter, or '(B)'); also accepts the option's text."""
    try:
        letter = gold.strip().strip("()")
        if extract_choice(completion) == letter:
            return 1.0
        final = extract_final(completion)
        return float(bool(gold_text) and final is not None and final == normalize_text(gold_text))
    except Exception:  # noqa: BLE001
        return 0.0


def score_free(completion: str, gold: str) -> float:
    """Free-form BBH answers ('True', 'Yes', '8', '] ) }'): numbers by value, text after normalisation."""
    try:
        final = extract_final(completion)
        if final is None:
            return 0.0
        if re.fullmatch(r"-?\d+(\.\d+)?", gold.strip()):
            return float(grade_number(final, gold))
        return float(final == normalize_text(gold))
    except Exception:  # noqa: BLE001
        return 0.0


def _is_choice(gold: str) -> bool:
    return re.fullmatch(r"\([A-R]\)", gold.strip()) is not None


@dataclass
class BbhConfig(HubConfig):
    name: str = "bbh"  # registry name
    hub_id: str = "SaylorTwift/bbh"  # parquet copy of lukaemon/bbh (a loading script; datasets>=4 refuses those)
    tasks: list[str] = _default(BBH_TASKS)  # BBH tasks to load: one hub config each, split "test"
    columns: dict[str, str] = _default({"prompt": "input", "answer": "target", "task": "task"})  # ours -> column
    split_map: dict[str, str] = _default({"test": "test"})  # the hub has test only
    donor: str = "test"  # train and val are carved from test, 10% each
    max_new_tokens: int = 384  # BBH chain-of-thought answers are a few sentences
    steps: StepsConfig = paper_steps()  # the paper: newline steps of >= 30 tokens, <= 30 steps

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.tasks) > 0, "benchmark.tasks", self.tasks, "a non-empty list of BBH task names")


@BENCHMARKS.register("bbh", BbhConfig)
class Bbh(HubBenchmark):
    """BIG-Bench Hard. Local files may hold any tasks (a `task` column is optional and not filtered)."""

    name = "bbh"
    cfg: BbhConfig

    def _read_hub(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for task in self.cfg.tasks:
            for split, rows in self._hub_splits(task).items():
                out.setdefault(split, []).extend({**r, "task": task} for r in rows)
        return out

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        row = super().convert(raw)
        row.setdefault("task", "bbh")
        return row

    def prompt(self, row: dict[str, Any]) -> str:
        template = CHOICE_TEMPLATE if _is_choice(row["answer"]) else FREE_TEMPLATE
        return template.format(question=row["prompt"])

    def score(self, completion: str, row: dict[str, Any]) -> float:
        gold = row["answer"]
        return score_choice(completion, gold) if _is_choice(gold) else score_free(completion, gold)

    def final_answer(self, completion: str) -> str | None:
        return extract_choice(completion) or extract_final(completion)

    def group_of(self, row: dict[str, Any]) -> str | None:
        return row.get("task")


@dataclass
class DateConfig(HubConfig):
    name: str = "date"  # registry name
    hub_id: str = "tasksource/bigbench"  # BIG-bench as parquet; date_understanding has train/validation
    hub_config: Optional[str] = "date_understanding"  # the BIG-bench task
    columns: dict[str, str] = _default({"prompt": "inputs", "choices": "multiple_choice_targets",
                                        "scores": "multiple_choice_scores"})  # gold = the choice scored 1
    split_map: dict[str, str] = _default({"train": "train", "test": "validation"})  # BIG-bench has no test split
    donor: str = "train"  # val is carved from train
    max_new_tokens: int = 256  # date arithmetic takes a few lines
    steps: StepsConfig = paper_steps()  # the paper: newline steps of >= 30 tokens, <= 30 steps


@BENCHMARKS.register("date", DateConfig)
class Date(HubBenchmark):
    """BIG-bench date_understanding as lettered multiple choice, in BBH's 'Options: (A) ...' layout."""

    name = "date"
    required = ("prompt", "choices", "scores")

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        row = super().convert(raw)
        text, choices, scores = row.get("prompt"), row.get("choices"), row.get("scores")
        ok = (isinstance(text, str) and isinstance(choices, list) and isinstance(scores, list)
              and 0 < len(choices) == len(scores) <= len(_LETTERS) and list(scores).count(1) == 1)
        if not ok:
            return {**row, "answer": None}
        # BIG-bench inputs look like 'Q: ...\n  choice: a\n  choice: b\nA:'; keep only the question.
        lines = [ln for ln in text.strip().splitlines() if not ln.strip().startswith("choice:")]
        question = re.sub(r"^Q:\s*", "", "\n".join(lines).strip())
        question = re.sub(r"\n?A:\s*$", "", question).strip()
        gold = scores.index(1)
        options = "\n".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(choices))
        return {**row, "prompt": f"Q: {question}\nOptions:\n{options}", "answer": _LETTERS[gold],
                "answer_text": str(choices[gold])}

    def prompt(self, row: dict[str, Any]) -> str:
        return CHOICE_TEMPLATE.format(question=row["prompt"])

    def score(self, completion: str, row: dict[str, Any]) -> float:
        return score_choice(completion, row["answer"], row.get("answer_text"))

    def final_answer(self, completion: str) -> str | None:
        return extract_choice(completion) or extract_final(completion)


