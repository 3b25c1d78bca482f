"""The house: imports run one way, down the layers, and form no circles.

    run, eval, report, bench, config_doc      (entry points and tools)
      -> training                             (Lightning, the round callback, warm start, objectives)
        -> config                             (the run's schema: collects what the layers below declare)
          -> rollout                          (engine, steps, estimators, one round's data)
            -> models, benchmarks, losses
              -> registry, versions

Every `import gpo_exp...` in the package (module level or inside a function) is an arrow, read with
ast. An arrow may stay in its layer or go down; one that goes up, or a cycle of arrows, fails.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gpo_exp"

# Layer of each top-level part of the package (higher imports lower).
LAYERS = {
    "run": 5, "eval": 5, "report": 5, "bench": 5, "config_doc": 5, "__init__": 5,
    "training": 4,
    "config": 3,
    "rollout": 2,
    "models": 1, "benchmarks": 1, "losses": 1,
    "registry": 0, "versions": 0,
}


def module_name(path: Path, base: Path = ROOT) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, base: Path = ROOT) -> set[str]:
    """gpo_exp modules that `path` imports (`from gpo_exp.a import b` names gpo_exp.a.b when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gpo_exp")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpo_exp") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if _is_module(sub, base) else node.module)
    return out


def _is_module(name: str, base: Path) -> bool:
    p = base.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph(base: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the gpo_exp modules it imports, for every module of base/gpo_exp."""
    mods = {module_name(p, base): p for p in sorted((base / "gpo_exp").rglob("*.py"))}
    return {name: imports(path, base) - {name} for name, path in mods.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: gpo_exp.{top} has no layer; add it to LAYERS in tests/test_imports.py")
    return LAYERS[top]


def upward_arrows(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in g.items() for b in targets if b in g and layer(b) > layer(a))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _package_parents(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """Arrows without a package's own __init__ re-exports of its children (a package importing its own
    submodules to present them is its table of contents, not a circle)."""
    return {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in g.items()}


def test_no_import_circles():
    assert cycles(_package_parents(graph())) == []


def test_no_arrow_runs_up_the_layers():
    assert upward_arrows(graph()) == []


def test_config_imports_nothing_from_training():
    assert {m for m in graph()["gpo_exp.config"] if m.startswith("gpo_exp.training")} == set()


def test_top_level_holds_only_entry_points_and_the_shared_bottom():
    loose = sorted(p.stem for p in PKG.glob("*.py"))
    assert loose == ["__init__", "config", "config_doc", "eval", "losses", "registry", "run", "versions"]


def test_the_checks_catch_a_circle_and_an_upward_arrow(tmp_path):
    pkg = tmp_path / "gpo_exp"
    for sub in ("rollout", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "rollout" / "a.py").write_text("from gpo_exp.training import b\n")  # rollout -> training: up
    (pkg / "training" / "b.py").write_text("def f():\n    from gpo_exp.rollout.a import x\n")  # back down: a circle
    g = graph(tmp_path)
    assert g["gpo_exp.rollout.a"] == {"gpo_exp.training.b"} and g["gpo_exp.training.b"] == {"gpo_exp.rollout.a"}
    assert upward_arrows(g) == ["gpo_exp.rollout.a -> gpo_exp.training.b"]
    assert cycles(_package_parents(g)) == [["gpo_exp.rollout.a", "gpo_exp.training.b"]]


@pytest.mark.parametrize("source, expected", [
    ("from gpo_exp.report.types import Run\n", {"gpo_exp.report.types"}),
    ("from gpo_exp.training import rundir\n", {"gpo_exp.training.rundir"}),
    ("import gpo_exp.losses\n", {"gpo_exp.losses"}),
    ("def f():\n    from gpo_exp.config import TrainerConfig\n", {"gpo_exp.config"}),
])
def test_imports_are_read_from_the_source(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports(path) == expected  # module names resolved against the real package
