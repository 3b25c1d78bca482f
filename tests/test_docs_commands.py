"""Every command in README.md and docs/ still works: it names real modules, flags, files and config keys.

Commands are read from fenced bash blocks and inline code spans. `python -m gpo_exp.run ...` and
`python -m gpo_exp.eval ...` are composed with Hydra's compose API and validated like a run would
be (every value of a `-m a,b` list and of an `a|b` alternative, one at a time; the jobs of a
`+sweep=` grid are validated by tests/test_sweeps.py);
other `python -m gpo_exp...` tools must exist and know each `--flag`, and their `key=value` overrides
must compose; `pytest` commands must name existing test files and markers; `make` commands existing
targets. Placeholders (`<run dir>`, `...`) are skipped, `[optional parts]` are checked too.
"""
from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = "\x00"  # stands for <...> in a command

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
STARTS = ("python -m gpo_exp", "pytest", "make ")


def commands(text: str) -> list[str]:
    """The commands of a markdown page, continuation lines joined, comments dropped."""
    found: list[str] = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "console", ""):
            found += body.replace("\\\n", " ").splitlines()
    found += [m.replace("\n", " ") for m in SPAN.findall(FENCE.sub("", text))]
    out = []
    for line in found:
        for part in re.split(r";|&&", line):
            part = re.sub(r"^\s*(do|then)\s+", "", part.strip())
            if part.startswith(STARTS):
                out.append(part)
    return out


def tokens(command: str) -> list[str]:
    """Shell words, with <placeholders> marked, optional [groups] unwrapped and `# comments` dropped."""
    command = re.sub(r"<[^<>]*>", PLACEHOLDER, command)
    command = re.sub(r"(?<=\s)\[([^\[\]]*)\](?=\s|$)", r"\1", command)  # [--lora 16] -> --lora 16
    command = re.sub(r"\$\w+", "0", command)  # shell loop variables: seed=$s
    return shlex.split(command, comments=True)


def _alternatives(value: str) -> list[str]:
    """`a,b` (a sweep) and `a|b` (either) as separate values; lists `[a,b]` and quoted values stay whole."""
    if value.startswith(("[", "{", "'", '"')):
        return [value]
    return [v for v in re.split(r"[,|]", value) if v] or [value]


def expand(overrides: list[str]) -> list[list[str]]:
    """One override list per alternative value, varying one key at a time (the others at their first value)."""
    keys, choices = [], []
    for o in overrides:
        key, sep, value = o.partition("=")
        keys.append(key + sep)
        choices.append(_alternatives(value) if sep else [""])
    first = [k + c[0] for k, c in zip(keys, choices)]
    out = [first]
    for i, c in enumerate(choices):
        out += [first[:i] + [keys[i] + v] + first[i + 1:] for v in c[1:]]
    return out


@lru_cache(maxsize=None)
def _compose(config: str, overrides: tuple[str, ...]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name=config, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def check_run(overrides: list[str]) -> None:
    """Compose and validate a `python -m gpo_exp.run` command (each sweep value, and each job of a +sweep grid)."""
    from gpo_exp.config import register_configs
    from gpo_exp.training.run_config import validate

    register_configs()
    for ov in expand(overrides):  # a +sweep= grid's own jobs are validated by tests/test_sweeps.py
        validate(_compose("config", tuple(ov)))


def check_eval(overrides: list[str]) -> None:
    from gpo_exp.eval import register_eval_config, validate

    register_eval_config()
    if not any(o.startswith("checkpoint=") for o in overrides):  # `run`: the placeholder checkpoint's run (its benchmark)
        overrides = [re.sub(r"(?<=[\[,])run(?=[,\]])", "arith_testbed", o) if o.startswith("benchmarks=") else o
                     for o in overrides]
    for ov in expand(overrides):
        validate(_compose("eval", tuple(ov)))


def check_tool(module: str, args: list[str]) -> None:
    """A `python -m` tool: the module exists, knows each --flag, and its key=value overrides compose."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    origin = Path(spec.origin)
    source = "\n".join(p.read_text() for p in (origin.parent.glob("*.py") if origin.name == "__init__.py" else [origin]))
    overrides, value_next = [], False
    for a in args:
        if a.startswith("--"):
            flag = a.split("=")[0]
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{module} has no option {flag}"
            value_next = "=" not in a and not re.search(rf"[\"']{flag}[\"'][^)]*store_true", source)
        elif value_next:  # the flag's value, e.g. --tokens-per-s hf=500
            value_next = False
        elif re.match(r"^[+~]?[\w.@/]+=", a):
            overrides.append(a)
    if overrides:
        check_run(overrides)


def check_pytest(args: list[str]) -> None:
    markers = (ROOT / "pyproject.toml").read_text()
    it = iter(args)
    for a in it:
        if a == "-m":
            for marker in re.findall(r"\w+", next(it)):
                assert marker in ("not", "and", "or") or f'"{marker}:' in markers, f"no pytest marker {marker}"
        elif a == "-k":
            next(it)
        elif not a.startswith("-"):
            assert (ROOT / a.split("::")[0]).exists(), f"no test file {a}"


def check_make(args: list[str]) -> None:
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    for a in args:
        if "=" not in a:
            assert a in targets, f"no make target {a}"


def check(command: str) -> None:
    """Raise (AssertionError, ConfigError or a Hydra error) when the command is broken."""
    words = [w for w in tokens(command) if PLACEHOLDER not in w and "..." not in w]
    if words[0] == "make":
        return check_make(words[1:])
    if words[0] == "pytest":
        return check_pytest(words[1:])
    assert words[:2] == ["python", "-m"], command
    module, args = words[2], words[3:]
    if module == "gpo_exp.run":
        return check_run([a for a in args if a not in ("-m", "--multirun")])
    if module == "gpo_exp.eval":
        return check_eval(args)
    return check_tool(module, args)


ALL = sorted({(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in commands(p.read_text())})


def test_the_pages_have_commands():
    assert len(ALL) > 50
    assert {p for p, _ in ALL} >= {"README.md", "docs/getting-started.md", "docs/testbed.md"}


@pytest.mark.parametrize("page, command", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_documented_command_works(page, command):
    check(command)


@pytest.mark.parametrize("command", [
    "python -m gpo_exp.run trainer.roundz=3",  # a key that does not exist
    "python -m gpo_exp.run optimizer=dpoo",  # an option that does not exist
    "python -m gpo_exp.run -m optimizer=dpo,simpo estimator.k=2,-1",  # the second value of a sweep is out of range
    "python -m gpo_exp.run optimizer=dpo|nope gpo.enabled=false",  # an alternative that does not exist
    "python -m gpo_exp.run +sweep=nosuchsweep",
    "python -m gpo_exp.eval 'benchmarks=[arith,nosuchbench]'",
    "python -m gpo_exp.report <dir> --no-such-flag",
    "python -m gpo_exp.bench.nosuchbench",
    "python -m gpo_exp.bench.testbed trainer.eval_sampels=4",
    "pytest -m slow tests/test_nosuch.py",
    "make nosuchtarget",
])
def test_a_broken_command_fails_the_check(command):
    with pytest.raises(Exception):
        check(command)


def test_commands_are_read_from_fences_and_spans():
    text = ("Run `python -m gpo_exp.run seed=1` or\n`python -m gpo_exp.run\ntrainer.rounds=2`; not `pip install x`.\n"
            "```bash\npython -m gpo_exp.run a=1 \\\nb=2   # comment\nfor s in 0 1; do python -m gpo_exp.run seed=$s; done\n```\n")
    found = [" ".join(c.split()) for c in commands(text)]
    assert sorted(found) == ["python -m gpo_exp.run a=1 b=2 # comment", "python -m gpo_exp.run seed=$s",
                             "python -m gpo_exp.run seed=1", "python -m gpo_exp.run trainer.rounds=2"]
    assert tokens("python -m gpo_exp.report <run dir> [--out x] # c") == ["python", "-m", "gpo_exp.report", PLACEHOLDER,
                                                                          "--out", "x"]
    assert tokens("python -m gpo_exp.run seed=$s")[-1] == "seed=0"
    assert expand(["a=1,2", "b=x|y", "c=[3,4]"]) == [["a=1", "b=x", "c=[3,4]"], ["a=2", "b=x", "c=[3,4]"],
                                                      ["a=1", "b=y", "c=[3,4]"]]
