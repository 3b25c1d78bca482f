"""The supported torch/transformers ranges: checked at start, and the same as pyproject.toml's."""
import re
import tomllib
from pathlib import Path

import pytest

from gpo_exp.registry import ConfigError
from gpo_exp.versions import SUPPORTED, check_versions

ROOT = Path(__file__).resolve().parents[1]


def test_supported_ranges_are_pyprojects():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.match(r"[A-Za-z0-9_.-]+", d).group(0): d[len(re.match(r"[A-Za-z0-9_.-]+", d).group(0)):]
                for d in deps}
    for package, spec in SUPPORTED.items():
        assert declared[package].replace(" ", "") == spec


def test_constraints_pin_a_supported_pair():
    for name in ("constraints.txt", "constraints-low.txt"):
        pins = dict(line.split("==") for line in (ROOT / name).read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
        check_versions({p: pins[p] for p in SUPPORTED})


@pytest.mark.parametrize("found", [{"torch": "2.11.0+cu128", "transformers": "5.17.0"},
                                   {"torch": "2.14.0", "transformers": "5.24.0"},
                                   {"torch": "2.13.0+cpu", "transformers": "5.20.2"}])
def test_supported_versions_pass(found):
    check_versions(found)


@pytest.mark.parametrize("found,named", [({"torch": "2.10.1", "transformers": "5.24.0"}, "torch==2.10.1"),
                                         ({"torch": "2.13.0", "transformers": "5.25.0"}, "transformers==5.25.0"),
                                         ({"torch": "2.13.0", "transformers": "4.57.1"}, "transformers==4.57.1"),
                                         ({"torch": "2.13.0", "transformers": None}, "transformers is not installed")])
def test_unsupported_versions_stop_with_one_line(found, named):
    with pytest.raises(ConfigError) as e:
        check_versions(found)
    msg = str(e.value)
    assert named in msg and "\n" not in msg
    assert SUPPORTED["transformers" if "transformers" in named else "torch"] in msg
