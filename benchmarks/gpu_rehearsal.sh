#!/usr/bin/env bash
# The CPU rehearsal of a GPU run (benchmarks/README.md): gpu_check.sh as it will run on the GPU machine, on a CPU.
#
#   bash benchmarks/gpu_rehearsal.sh [VENV] [-- gpu_check.sh arguments]   # VENV default /tmp/zipr1_rehearsal_venv
#
# 1. VENV: a fresh venv (no system site-packages) holding a stand-in of the machine's preinstalled stack, installed
#    from the registry: torch (CPU build; the machine has 2.11+cu130), transformers 5.17.0, huggingface-hub 1.33.0,
#    tokenizers 0.23.2, safetensors 0.8.0, triton 3.6.0 (the machine's versions) and what the repo imports that the
#    machine has (numpy, pillow, einops, tqdm, matplotlib, pytest, pyarrow, pandas, ...). No datasets, no PyAV.
#    numpy < 2.4 (the machine has 2.5.2): Triton 3.6's interpreter calls int() on one-element arrays, an error since
#    NumPy 2.4 (every kernel fails with "only 0-dimensional arrays can be converted to Python scalars"); on the GPU
#    Triton compiles the kernels and never interprets them.
#    `python` is removed from VENV/bin: only python3 is on the PATH, as there.
# 2. A wheelhouse for this Python (gpu_wheels.sh --python-version X.Y --dest VENV/wheels): the same exact wheels as
#    .whl/, built for this interpreter (the machine's is 3.12).
# 3. gpu_check.sh --dry-run --install-from VENV/wheels with PATH=VENV/bin:/usr/bin:/bin and PYTHON unset: the
#    wheelhouse goes in with pip --no-index --no-deps --target, first on PYTHONPATH, and every step runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-${TMPDIR:-/tmp}/zipr1_rehearsal_venv}"
[ $# -eq 0 ] || shift
[ "${1:-}" != "--" ] || shift
BASE_PYTHON="${BASE_PYTHON:-$(command -v python3)}"
TORCH="${TORCH:-torch}"  # e.g. a local CPU wheel: TORCH=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

if [ ! -x "$VENV/bin/python3" ]; then
  "$BASE_PYTHON" -m venv "$VENV"
  "$VENV/bin/python3" -m pip install -q "$TORCH" transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 \
    safetensors==0.8.0 triton==3.6.0 "numpy<2.4" pillow einops tqdm matplotlib pytest pyarrow pandas pyyaml requests \
    filelock fsspec xxhash httpx typer regex packaging
fi
rm -f "$VENV/bin/python"
PYVER=$("$VENV/bin/python3" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
PYTHON="$VENV/bin/python3" bash benchmarks/gpu_wheels.sh --python-version "$PYVER" --dest "$VENV/wheels"
echo "# stand-in of the preinstalled stack:"
"$VENV/bin/python3" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|huggingface.hub|tokenizers|triton|datasets|av) '
env -u PYTHON -u PYTHONPATH PATH="$VENV/bin:/usr/bin:/bin" bash -c \
  '! command -v python >/dev/null || { echo "python is on the PATH: $(command -v python)"; exit 1; }
   exec bash benchmarks/gpu_check.sh --dry-run --install-from "$0/wheels" "$@"' "$VENV" "$@"
