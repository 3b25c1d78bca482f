#!/usr/bin/env bash
# The wheels `python -m gpo_exp.bench.gpu_round` needs on a GPU image that already has torch (CUDA),
# transformers, peft and pytorch-lightning (with their own dependencies: numpy, safetensors, tokenizers,
# huggingface_hub, accelerate, sympy, pyyaml, ...), and no network. All pure python (py3-none-any),
# at the versions of constraints.txt where it pins them; under 64 MiB in all (about 1 MiB).
#
#   bash gpo_exp/bench/gpu_wheels.sh [DIR]                        # here, where pip can download (default DIR: gpu_wheels)
#   pip install --no-deps --no-index DIR/*.whl                     # there, offline
#   python -m gpo_exp.bench.gpu_round                              # there, from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="${1:-gpu_wheels}"
PIP="${PIP:-python -m pip}"
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$DIR"
# hydra-core + omegaconf (config), math-verify + latex2sympy2_extended (graders of the math benchmarks)
$PIP download --quiet --no-deps --only-binary=:all: -c constraints.txt -d "$DIR" \
  hydra-core omegaconf math-verify "latex2sympy2_extended==1.11.0"
# antlr4-python3-runtime 4.9.3 (omegaconf's grammar runtime) is published as a source archive only: build its wheel here
$PIP wheel --quiet --no-deps -w "$DIR" "antlr4-python3-runtime==4.9.3"
rm -f "$DIR"/*.tar.gz
for whl in "$DIR"/*.whl; do
  case "$whl" in *-none-any.whl) ;; *) echo "error: $whl is not a pure-python wheel" >&2; exit 1 ;; esac
done
SIZE=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -1 "$DIR"
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $((SIZE / 1024)) KiB in $DIR (limit 64 MiB)"
if [ "$SIZE" -gt "$LIMIT" ]; then echo "error: $DIR holds $SIZE bytes, over 64 MiB" >&2; exit 1; fi
echo "on the GPU machine: pip install --no-deps --no-index $DIR/*.whl && python -m gpo_exp.bench.gpu_round"
