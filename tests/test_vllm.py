"""ivcp's vLLM plugin (ivcp.vllm), run in the vLLM environment's own Python (.venv-vllm, made by
``bash scripts/setup.sh --vllm``; or $IVCP_VLLM_PYTHON). vLLM pins transformers and torch versions of its
own, so it lives beside the project's .venv; these tests skip, saying so, where it is absent.

- parity: 50 generated grounding prompts (five picture sizes, every fifth with two pictures, all
  submitted at once so the engine batches them) served through vLLM + the plugin give the same greedy
  answers, token for token, as ivcp's HF path, and each prompt's KV length in vLLM equals
  ``session.last.kv_lengths`` of the HF cache in every layer; the same for random pruning;
- plugin off: the plugin's model class with no method answers as plain vLLM does;
- errors: bad method names / parameters, methods it cannot serve exactly, prefix caching, chunked
  prefill, tensor / pipeline parallelism — one-line errors (tests/vllm_checks.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("IVCP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _vllm_ready() -> str | None:
    if not VLLM_PYTHON.is_file():
        return f"no vLLM environment at {VLLM_PYTHON}: make it with `bash scripts/setup.sh --vllm`"
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, ivcp.vllm"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode:
        return f"{VLLM_PYTHON} cannot import vllm and ivcp.vllm: {probe.stderr.strip().splitlines()[-1:]}"
    return None


_REASON = _vllm_ready()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def run(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(VLLM_PYTHON), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def share(output: str, label: str) -> float:
    found = re.search(rf"{label}:\s+([\d.]+) %", output)
    assert found, f"no '{label}' line in the parity output:\n{output[-3000:]}"
    return float(found.group(1))


@pytest.mark.parametrize("method,params,n", [("ivc_prune", "{}", 50), ("random", '{"keep_ratio": 0.3}', 5)])
def test_parity_with_hf_path(method, params, n, tmp_path):
    done = run("scripts/vllm_parity.py", "--method", method, "--params", params, "--n", str(n),
               "--model-dir", str(tmp_path / "grounder"))
    out = done.stdout + done.stderr
    assert share(out, "identical answers") == 100.0, out[-3000:]
    assert share(out, "KV length equal") == 100.0, out[-3000:]
    assert done.returncode == 0, out[-3000:]
    assert f"{n} prompts" in done.stdout


def test_plugin_off_is_plain_vllm(tmp_path):
    done = run("scripts/vllm_parity.py", "--method", "none", "--n", "5", "--model-dir", str(tmp_path / "grounder"))
    out = done.stdout + done.stderr
    assert share(out, "identical answers") == 100.0, out[-3000:]
    assert done.returncode == 0, out[-3000:]


def test_clear_errors():
    done = run("tests/vllm_checks.py", timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for name in ("names_and_params", "refused_methods", "kept_counts", "engine_settings"):
        assert f"ok {name}" in done.stdout
