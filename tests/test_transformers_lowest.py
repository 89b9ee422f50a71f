"""The lowest transformers ivcp allows (pyproject.toml's ``transformers>=…``), tested beside the newest: a subset of
the suite (every family's oracle-exactness test, DeepSeek-VL2's remote-layout forward, the harness's prompt tests,
the cache keyword) run again in .venv-lowest, a venv layered on .venv that holds only that transformers release and
what it needs beyond .venv's packages (``bash scripts/setup.sh`` makes it; or $IVCP_LOWEST_PYTHON). The rest of the
suite runs on .venv's transformers, the newest release the installer picks."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOWEST_PYTHON = Path(os.environ.get("IVCP_LOWEST_PYTHON", ROOT / ".venv-lowest" / "bin" / "python"))

# What must hold on the lowest release too; each is the test that proves it on the newest (in .venv).
SUBSET = [
    "tests/test_compat.py",
    "tests/test_families.py::test_the_authors_settings_match_the_oracle",
    "tests/test_families.py::test_every_method_with_family_defaults_matches_the_oracle[qwen2_5_vl-fastv-eager]",
    "tests/test_families.py::test_every_method_with_family_defaults_matches_the_oracle[internvl-vscan-eager]",
    "tests/test_deepseek_vl2.py::test_native_model_equals_the_remote_layout_forward",
    "tests/test_deepseek_vl2.py::test_every_method_matches_the_oracle[ivc_prune-eager-deepseek_vl2]",
    "tests/test_deepseek_vl2.py::test_every_method_matches_the_oracle[pdrop-sdpa-deepseek_vl2_mha]",
    "tests/test_deepseek_vl2.py::test_generate_equals_greedy_without_cache_and_batches",
    "tests/test_processors.py::test_a_real_processor_tokenizes_the_chat_like_the_two_step_path",
    "tests/test_vlmeval_plugin.py::test_prompts_equal_the_authors_or_the_datasets",
    "tests/test_vlmeval_plugin.py::test_qwen3_prompts_follow_vlmevalkits_qwen3_wrapper",
    "tests/test_vlmeval_plugin.py::test_internvl_prompts_are_the_authors",
    "tests/test_vlmeval_plugin.py::test_llava_prompts_are_the_authors_vicuna_text",
    "tests/test_deepseek_vl2_plugin.py::test_prompts_are_vlmevalkits_deepseek_vl2_wrapper",
]


def lowest_allowed() -> str:
    """The X of pyproject.toml's ``transformers>=X`` (the one place the lowest allowed release is written)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        found = re.fullmatch(r"transformers\s*>=\s*([\w.]+)(\s*,.*)?", requirement.strip())
        if found:
            return found.group(1)
    raise AssertionError("pyproject.toml lists no transformers>=X dependency")


def _same_release(installed: str, wanted: str) -> bool:
    """5.17.0 is the release 5.17 names (trailing zeros padded, as pip's ==5.17 matches)."""
    pad = lambda v: [int(p) for p in v.split(".")] + [0] * 3  # noqa: E731
    return pad(installed)[:3] == pad(wanted)[:3]


def _probe() -> tuple[str | None, str]:
    """(why the lowest environment cannot run, or None; its transformers version)."""
    if not LOWEST_PYTHON.is_file():
        return f"no lowest-transformers environment at {LOWEST_PYTHON}: make it with `bash scripts/setup.sh`", ""
    done = subprocess.run([str(LOWEST_PYTHON), "-c", "import ivcp, transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return f"{LOWEST_PYTHON} cannot import ivcp and transformers: {done.stderr.strip().splitlines()[-1:]}", ""
    return None, done.stdout.strip()


_REASON, _VERSION = _probe()
pytestmark = pytest.mark.skipif(_REASON is not None or os.environ.get("IVCP_IN_LOWEST") == "1",
                                reason=_REASON or "already running in the lowest environment")


def test_the_lowest_environment_holds_the_lowest_allowed_release():
    assert _same_release(_VERSION, lowest_allowed()), (
        f"{LOWEST_PYTHON} has transformers {_VERSION}, but pyproject.toml allows >= {lowest_allowed()}: "
        "rerun `bash scripts/setup.sh`")


def test_the_subset_passes_on_the_lowest_allowed_transformers():
    assert _same_release(_VERSION, lowest_allowed())
    env = dict(os.environ, IVCP_IN_LOWEST="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(LOWEST_PYTHON), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *SUBSET],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    out = done.stdout + done.stderr
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert done.returncode == 0, (f"on transformers {_VERSION} (the lowest allowed, {LOWEST_PYTHON}): "
                                  f"{failed or 'pytest exited ' + str(done.returncode)}\n{out[-4000:]}")
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    if importlib.util.find_spec("vlmeval") is not None:  # the eval tier: the harness's tests run, none skips
        assert not skipped, f"skipped on transformers {_VERSION}: {skipped}"
