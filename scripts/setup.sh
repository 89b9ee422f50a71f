#!/usr/bin/env bash
# Make (or refresh) the project's environment in .venv and install ivcp into it, editable.
# Idempotent: a second run installs nothing new. Override the interpreter with PYTHON=...,
# the torch requirement with IVCP_TORCH=... (default: torch 2.13.0, the CPU build where offered).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
IVCP_TORCH=${IVCP_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "$IVCP_TORCH"
fi
pip install -e ".[test]"
.venv/bin/python -c "import ivcp, torch, transformers; print(f'ivcp {ivcp.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
