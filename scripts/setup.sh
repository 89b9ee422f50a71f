#!/usr/bin/env bash
# Make (or refresh) the project's environment in .venv and install ivcp into it, editable.
# Idempotent: a second run installs nothing new.
#
#   bash scripts/setup.sh          everything: ivcp + tests + plots + the evaluation harness (the
#                                  pip-installed VLMEvalKit, `ms-vlmeval`). VLMEvalKit needs torchvision,
#                                  whose PyPI build comes with PyPI's CUDA torch (~6 GB; it runs on CPU too).
#   bash scripts/setup.sh --core   the core and its tests only, with torch 2.13 (the CPU build where the
#                                  machine offers one); no VLMEvalKit: the evaluation tests are skipped.
#
# PYTHON=... picks the interpreter for the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TIER=full
[ "${1:-}" = "--core" ] && TIER=core
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if [ "$TIER" = core ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
  pip install -e ".[test]"
else
  pip install -e ".[test,eval]"
fi
.venv/bin/python - <<'PY'
import importlib.util
import ivcp, torch, transformers
vlmeval = "VLMEvalKit installed" if importlib.util.find_spec("vlmeval") else "no VLMEvalKit (core tier)"
print(f"ivcp {ivcp.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, {vlmeval}")
PY
