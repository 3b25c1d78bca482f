"""A virtual environment that sees only what a GPU image plus gpu_wheels.sh provides, to check that
`gpo_exp.bench.gpu_round` needs nothing else.

    python -m gpo_exp.bench.image_venv /tmp/imgvenv          # from the full environment (e.g. make install's)
    PYTHONPATH=$PWD /tmp/imgvenv/bin/python -m gpo_exp.bench.gpu_round --cpu-smoke

The new venv (no system site-packages) links, from this interpreter's environment, the files of torch,
transformers, peft and pytorch-lightning and of every distribution they require (what an image with
those four installed holds), plus the distributions of gpu_wheels.sh. Any other import then fails as it
would on the image. The versions are this environment's, not the image's.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

IMAGE = ("torch", "transformers", "peft", "pytorch-lightning")
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "math-verify", "latex2sympy2_extended")  # gpu_wheels.sh


def closure(roots: tuple[str, ...]) -> dict[str, md.Distribution]:
    """The installed distributions `roots` need, their requirements included (extras left out)."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    found: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in found:
            continue
        try:
            found[name] = dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional platform dependency (CUDA libraries on a CPU build)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="the venv to create (must not exist)")
    args = ap.parse_args(argv)
    out = Path(args.dir)
    if out.exists():
        raise SystemExit(f"{out}: exists; allowed: a new directory")
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(out)], check=True)
    dst = Path(subprocess.run([str(out / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip())
    dists = closure(IMAGE + WHEELS)
    linked = 0
    for dist in dists.values():
        base = Path(str(dist.locate_file("")))
        for top in {Path(f).parts[0] for f in dist.files or [] if Path(f).parts and Path(f).parts[0] != ".."}:
            if (base / top).exists() and not (dst / top).exists():
                os.symlink(base / top, dst / top)
                linked += 1
    print(f"{out}: {len(dists)} distributions ({', '.join(sorted(dists))}), {linked} links")


if __name__ == "__main__":
    main()
