#!/usr/bin/env bash
# Create .venv (if missing) and install ssimae with everything the tests need.
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${SSIMAE_TORCH_VERSION:-2.13.0}" -e ".[dev]"
