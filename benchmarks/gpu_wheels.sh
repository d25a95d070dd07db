#!/usr/bin/env bash
# The wheelhouse that travels with the tree to the air-gapped GPU machine: the exact wheels its preinstalled stack
# (torch 2.11+cu130, transformers 5.17, triton 3.6, torchvision 0.26, Python 3.12; benchmarks/gpu_preinstalled.txt)
# lacks. Run it on a machine with registry access, from anywhere in the repo:
#
#   bash benchmarks/gpu_wheels.sh                       # .whl/ for cp312 manylinux x86_64 (the GPU machine)
#   bash benchmarks/gpu_wheels.sh --with-av             # + PyAV, only if the GPU check decodes video files
#   bash benchmarks/gpu_wheels.sh --python-version 3.11 --dest DIR   # for the CPU rehearsal (benchmarks/README.md)
#
# Each wheel is fetched with --no-deps at an exact version, so nothing pulls torch; then wheel_deps.py checks that
# the folder holds no torch / triton / nvidia-* wheel and that every requirement of every wheel is met by a wheel
# of the folder or by a preinstalled package, and the script prints the folder's files and size. Exit 1 otherwise.
# On the GPU machine: bash benchmarks/gpu_check.sh --install-from .whl (pip install --no-index --no-deps --target).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYVER=3.12 DEST=.whl AV=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    --with-av) AV=1 ;;
    *) echo "usage: bash benchmarks/gpu_wheels.sh [--python-version 3.12] [--dest .whl] [--with-av]" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

# What the GPU machine lacks (versions: what this repo is tested with, requirements.txt):
#   transformers 5.23.0  mm_encoder_outputs (>= 5.18) and activation_checkpointing_enable (>= 5.23); its other
#                        requirements (huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8, regex, typer) are
#                        preinstalled there
#   datasets 5.2.0       data.py; of its requirements only dill and multiprocess are not preinstalled
#   av 18.1.0            PyAV (optional): decodes .mp4; the GPU check itself uses no video file
WHEELS=(transformers==5.23.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
[ "$AV" = 0 ] || WHEELS+=(av==18.1.0)
# manylinux tags pip may take (it matches each exactly); the machine runs Ubuntu's Python 3.12.3, glibc 2.39
PLATFORMS=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$tag")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each package: stale wheels would stop the install there
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
"$PYTHON" benchmarks/wheel_deps.py closure "$DEST" --python-version "$PYVER"
echo "# $DEST for Python $PYVER: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1) bytes"
ls -l "$DEST"/*.whl | awk '{print "#   " $5 "  " $NF}'
