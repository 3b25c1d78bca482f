"""`python -m gpo_exp.config_doc [--write docs/configuration.md]`: the config reference, read from the dataclasses.

Every field is declared once, in its dataclass, with a one-line comment. This module turns those
declarations into the field tables of docs/configuration.md (name, type, default, comment), so the
reference is generated, not written; tests/test_docs.py fails when the page and the code disagree.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from functools import lru_cache
from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED: python -m gpo_exp.config_doc --write docs/configuration.md -->"
END = "<!-- END GENERATED -->"


@lru_cache(maxsize=None)
def _field_comments(module_file: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on that field's line(s), for every class in a module."""
    source = Path(module_file).read_text()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                text = next((comments[i] for i in lines if i in comments), "")
                out[(node.name, stmt.target.id)] = text
    return out


def field_comment(cls: type, name: str) -> str:
    """The comment of field `name` where it is declared (the class itself or the nearest base)."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return _field_comments(inspect.getsourcefile(klass))[(klass.__name__, name)]
    raise KeyError(f"{cls.__name__} has no field {name}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`" if isinstance(value, str) and value == "" else f"`{value}`"


def rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, comment) for every field of `cls`; nested dataclasses expand to `prefix.a.b` rows."""
    out = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if dataclasses.is_dataclass(default):
            out.append((f"{prefix}.{f.name}", ftype, "(section)", field_comment(cls, f.name)))
            out += rows(type(default), f"{prefix}.{f.name}")
            continue
        out.append((f"{prefix}.{f.name}", ftype, _show(default), field_comment(cls, f.name)))
    return out


def sections() -> list[tuple[str, str, type]]:
    """(heading, key prefix, dataclass) for every section of the run config, registries expanded."""
    from gpo_exp.benchmarks import BENCHMARKS
    from gpo_exp.config import LoggerConfig, TrainerConfig, WarmStartConfig
    from gpo_exp.models.config import ModelConfig
    from gpo_exp.rollout.engine import EngineConfig
    from gpo_exp.rollout.estimators import ESTIMATORS
    from gpo_exp.rollout.gpo_round import GPOConfig
    from gpo_exp.training.objectives import OPTIMIZERS

    out: list[tuple[str, str, type]] = [
        ("gpo", "gpo", GPOConfig), ("trainer", "trainer", TrainerConfig), ("engine", "engine", EngineConfig),
        ("logger", "logger", LoggerConfig), ("warm_start", "warm_start", WarmStartConfig), ("model", "model", ModelConfig),
    ]
    for group, registry in (("optimizer", OPTIMIZERS), ("estimator", ESTIMATORS), ("benchmark", BENCHMARKS)):
        by_cls: dict[type, list[str]] = {}
        for name in registry.names():
            by_cls.setdefault(registry.entry(name)[0], []).append(name)
        for cls, names in by_cls.items():
            out.append((f"{group}={','.join(names)}", group, cls))
    return out


def reference() -> str:
    """The generated part of docs/configuration.md."""
    parts = [BEGIN, ""]
    for heading, prefix, cls in sections():
        parts += [f"### `{heading}`", "", f"`{cls.__module__}.{cls.__qualname__}`", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        parts += [f"| `{k}` | `{_cell(t)}` | {_cell(d)} | {_cell(c)} |" for k, t, d, c in rows(cls, prefix)]
        parts.append("")
    parts.append(END)
    return "\n".join(parts) + "\n"


def splice(page: str, generated: str) -> str:
    """The page with its generated block replaced by `generated`."""
    head, sep, rest = page.partition(BEGIN)
    if not sep or END not in rest:
        raise ValueError(f"the page has no generated block ({BEGIN} ... {END})")
    return head + generated + rest.partition(END)[2].lstrip("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PAGE", help="replace the generated block of this markdown page")
    args = parser.parse_args(argv)
    if args.write:
        page = Path(args.write)
        page.write_text(splice(page.read_text(), reference()))
        print(f"wrote {page}")
    else:
        sys.stdout.write(reference())


if __name__ == "__main__":
    main()
