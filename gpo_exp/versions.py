"""The torch and transformers versions gpo-exp supports, checked at start.

The ranges are the ones pyproject.toml declares (tests/test_versions.py keeps the two equal). Outside
them a run would fail later with an AttributeError deep inside generation or training, so `run` and
`eval` stop first with one line naming the installed version and the supported range.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from gpo_exp.registry import ConfigError

# Package -> supported range; the same strings as pyproject.toml's [project.dependencies].
SUPPORTED: dict[str, str] = {
    "torch": ">=2.11,<2.15",
    "transformers": ">=5.17,<5.25",
}


def installed(package: str) -> str | None:
    """The installed distribution's version string, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_versions(found: dict[str, str | None] | None = None) -> None:
    """Raise ConfigError (one line) when torch or transformers is missing or outside SUPPORTED.
    `found` overrides the installed versions (tests)."""
    for package, spec in SUPPORTED.items():
        have = found[package] if found is not None else installed(package)
        if have is None:
            raise ConfigError(f"{package} is not installed; gpo-exp needs {package}{spec} (make install, or "
                              f"pip install -c constraints.txt -e .)")
        # A local build tag (2.13.0+cpu, 2.11.0+cu128) does not change the release it belongs to.
        if Version(Version(have).base_version) not in SpecifierSet(spec):
            raise ConfigError(f"unsupported {package}=={have}: gpo-exp supports {package}{spec} (pip install -c "
                              f"constraints.txt -e . installs the tested pair)")
