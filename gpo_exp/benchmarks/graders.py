"""Answer extraction and checking shared by the real benchmarks.

Every function here is total: it never raises and returns None/False when nothing usable is found,
because a sampled continuation can be any string (cut off mid-formula, empty, 10k tokens of noise).
Inputs are truncated to their last `MAX_CHARS` characters so regex work stays bounded, and
math-verify runs under its own timeouts (signal based, so only on the main thread; elsewhere it
runs without them and the length cap is the bound).
"""
from __future__ import annotations

import logging
import re
import threading

log = logging.getLogger(__name__)

MAX_CHARS = 8000  # only the tail of a completion is searched; final answers live at the end
MATH_TIMEOUT_S = 5  # math-verify parse and verify timeouts (seconds each)

# math-verify logs a warning on every call made without a timeout (our off-main-thread path).
logging.getLogger("math_verify").setLevel(logging.ERROR)

# A number as people write it: optional sign, digits with thousands commas, optional decimals.
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*(?:\d+))?")
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)
_CHOICE_AFTER_RE = re.compile(r"^\s*[\*\"'`$]*\s*(?:\\text\{)?\(?\s*([A-Ra-r])\s*\)?(?![A-Za-z])")
_LINE_CHOICE_RE = re.compile(r"^\s*\(?([A-R])\)(?:\s|\.|$)")
_BARE_CHOICE_RE = re.compile(r"^\s*\(?([A-R])\)?\s*\.?\s*$")


def _tail(text: object) -> str:
    return text[-MAX_CHARS:] if isinstance(text, str) else ""


def to_number(text: object) -> float | None:
    """The first number in `text` as a float: '$1,234.50' -> 1234.5, '18 eggs' -> 18, '3/4' -> 0.75."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        return None
    m = _NUM_RE.search(text.replace("$", " ").replace("\\!", "")[:200])
    if not m:
        return None
    tok = m.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(tok)
    except ValueError:
        return None


def number_str(x: float) -> str:
    """Canonical string of a number: 18.0 -> '18', 0.50 -> '0.5'."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def grade_number(pred: object, gold: object) -> bool:
    """True when the first numbers in `pred` and `gold` agree (commas, '$', units, '.0' ignored)."""
    try:
        p, g = to_number(pred), to_number(gold)
        if p is None or g is None:
            return False
        return abs(p - g) <= 1e-6 * max(1.0, abs(g))
    except Exception:  # noqa: BLE001 -- a grader must never raise
        return False


def extract_boxed(text: object) -> str | None:
    """Content of the last balanced \\boxed{...} (or \\fbox{...}) in `text`, else None."""
    s = _tail(text)
    start = max(s.rfind("\\boxed{"), s.rfind("\\fbox{"))
    if start < 0:
        return None
    i = s.index("{", start) + 1
    depth, j = 1, i
    while j < len(s) and depth:
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        j += 1
    return s[i : j - 1].strip() if depth == 0 else None


def extract_gsm8k(text: object) -> str | None:
    """Final answer of a GSM8K-style completion as a canonical number string, else None.

    The first '#### N' wins (a model that keeps going after it is writing a new problem); without
    one, the first 'answer is N'. Returns e.g. '1234' for '#### $1,234' and '8' for '#### 8.0'.
    """
    s = _tail(text)
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        m = pattern.search(s)
        if m:
            x = to_number(m.group(1))
            if x is not None:
                return number_str(x)
    return None


def score_gsm8k(completion: object, gold: object) -> float:
    """GSM8K grading: the '#### N' (else 'answer is N', else last \\boxed{N}) number equals `gold`."""
    try:
        pred = extract_gsm8k(completion)
        if pred is None:
            pred = extract_boxed(completion)
        return float(pred is not None and grade_number(pred, gold))
    except Exception:  # noqa: BLE001 -- a grader must never raise
        return 0.0


def extract_choice(text: object) -> str | None:
    """Multiple-choice letter (upper case) of a completion, else None.

    Looks, in order, for 'answer is (B)' / 'Answer: B', then \\boxed{B}, then a final line that is
    or starts with an option label ('(B)', 'B)', '(B) 12/14/1937').
    """
    s = _tail(text)
    for m in _ANSWER_IS_RE.finditer(s):
        c = _CHOICE_AFTER_RE.match(m.group(1))
        if c and (c.group(1).isupper() or re.search(r"[()]", c.group(0))):
            return c.group(1).upper()
    boxed = extract_boxed(s)
    if boxed is not None:
        c = _BARE_CHOICE_RE.match(re.sub(r"\\text\{([^}]*)\}", r"\1", boxed))
        if c:
            return c.group(1)
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    if lines:
        c = _LINE_CHOICE_RE.match(lines[-1]) or _BARE_CHOICE_RE.match(lines[-1])
        if c:
            return c.group(1)
    return None


def extract_final(text: object) -> str | None:
    """Free-form final answer: the rest of the line after the first 'answer is', normalised."""
    m = _ANSWER_IS_RE.search(_tail(text))
    return normalize_text(m.group(1)) if m else None


def normalize_text(s: str) -> str:
    """Lower case, outer quotes/markdown/$ and trailing periods removed, spaces collapsed."""
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    for _ in range(2):  # '**Yes**.' needs the period and the markdown stripped in turn
        s = s.strip().rstrip(".").strip("*`\"'$ ")
    return " ".join(s.lower().split())


def _math_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may set.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def grade_math(pred_text: object, gold: object) -> bool:
    """True when math-verify finds the completion's answer (\\boxed{} first) equal to `gold`.

    `gold` is a LaTeX answer without delimiters ('\\frac{14}{3}', '(3, \\frac{\\pi}{2})', '204').
    Equivalent forms agree: 0.5 vs \\frac12, '1,000' vs 1000, '5\\text{ cm}' vs 5.
    """
    try:
        from math_verify import parse, verify

        if not isinstance(pred_text, str) or gold is None:
            return False
        t = _math_timeout()
        g = str(gold).strip()
        wrapped = g if ("$" in g or "\\boxed" in g) else f"${g}$"
        gold_parsed = parse(wrapped, parsing_timeout=t) or parse(g, parsing_timeout=t)
        pred_parsed = parse(_tail(pred_text), parsing_timeout=t)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))
    except Exception as e:  # noqa: BLE001 -- includes math-verify's TimeoutException
        log.debug("grade_math failed on %r: %s", str(pred_text)[-80:], e)
        return False


def _parse_answer(ans: object) -> list:
    """math-verify's parse of a bare LaTeX answer ('\\frac{3}{4}', '0.75', '(1, 2)'); [] when unparsable."""
    from math_verify import parse

    a = str(ans).strip()
    t = _math_timeout()
    return parse(a if ("$" in a or "\\boxed" in a) else f"${a}$", parsing_timeout=t) or parse(a, parsing_timeout=t)


def math_equal(a: object, b: object) -> bool:
    """True when two final answers are the same by math-verify ('\\frac{3}{4}' vs '0.75' vs '3/4'); else
    string equality after whitespace removal (what cannot be parsed is compared as text)."""
    try:
        if a is None or b is None:
            return False
        if "".join(str(a).split()) == "".join(str(b).split()):
            return True
        from math_verify import verify

        pa, pb = _parse_answer(a), _parse_answer(b)
        return bool(pa and pb and verify(pa, pb, timeout_seconds=_math_timeout()))
    except Exception as e:  # noqa: BLE001 -- includes math-verify's TimeoutException
        log.debug("math_equal failed on %r vs %r: %s", str(a)[:80], str(b)[:80], e)
        return False
