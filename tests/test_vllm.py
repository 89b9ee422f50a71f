"""ivcp's vLLM plugin (ivcp.vllm), run in the vLLM environment's own Python (.venv-vllm, a layer on .venv
made by ``bash scripts/setup.sh``; or $IVCP_VLLM_PYTHON). vLLM pins a transformers version of its own, so
it lives beside the project's .venv; these tests skip, saying so, where it is absent (``--no-vllm``,
``--core``).

Everything runs in ONE subprocess (``tests/vllm_checks.py --suite``, a module-scoped fixture): vLLM is
imported once and each model gets one engine that serves all its methods in one mixed batch (the first
method is the model's, the others come per request through ``mm_processor_kwargs``). The tests read
the sections of its output:

- parity on the tiny grounder (Qwen2.5-VL), a tiny Qwen2-VL and a tiny Qwen3-VL: greedy answers token
  for token equal to ivcp's HF path, each prompt's KV length in vLLM equal to ``session.last.kv_lengths``
  (every layer), kept token sets equal — 50 grounder prompts and 50 Qwen3-VL prompts with ivc_prune
  (five picture sizes, every fifth with two pictures), random pruning, the Tab. 6 patterns, drop_ivc and
  the IVC tokens alone (kept counts that depend on the image's position in the prompt), a selection layer
  before Qwen3-VL's last deepstack level, and unpruned requests;
- plugin off: the plugin's model class with no method answers as plain vLLM does;
- errors: bad method names / parameters (at load and per request), methods it cannot serve exactly,
  prefix caching, chunked prefill, tensor / pipeline parallelism — one-line errors;
- ``vllm serve``: the OpenAI-compatible server with the plugin answers a chat request with a picture as
  offline ``vllm.LLM`` does.
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
        return f"no vLLM environment at {VLLM_PYTHON}: make it with `bash scripts/setup.sh` (without --no-vllm / --core)"
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, ivcp.vllm"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode:
        return f"{VLLM_PYTHON} cannot import vllm and ivcp.vllm: {probe.stderr.strip().splitlines()[-1:]}"
    return None


_REASON = _vllm_ready()


def test_ci_builds_the_vllm_environment():
    """CI runs the README's set-up, which makes .venv-vllm: there these tests must run, not skip."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI the vLLM environment is optional (scripts/setup.sh --no-vllm / --core)")
    assert _REASON is None, _REASON


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Run the whole vLLM suite once; section name → (exit status, output). Skips without the vLLM
    environment."""
    if _REASON is not None:
        pytest.skip(_REASON)
    out = tmp_path_factory.mktemp("vllm")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run([str(VLLM_PYTHON), "tests/vllm_checks.py", "--suite", str(out)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=3600)
    sections = {}
    for rc in out.glob("*.rc"):
        sections[rc.stem] = (int(rc.read_text()), (out / f"{rc.stem}.log").read_text())
    assert sections, f"the vLLM suite wrote nothing:\n{(done.stdout + done.stderr)[-4000:]}"
    return sections


def section(suite, name: str) -> str:
    assert name in suite, f"section {name} did not run: {sorted(suite)}"
    rc, text = suite[name]
    assert rc == 0, f"section {name} failed:\n{text[-4000:]}"
    return text


def shares(text: str, label: str) -> dict[str, float]:
    """method label → the share on its '[method] label: x %' line."""
    return {m: float(v) for m, v in re.findall(rf"^\[(.+?)\] {label}:\s+([\d.]+) %", text, flags=re.M)}


def check_parity(text: str, expected: dict[str, int]) -> None:
    """Every method of ``expected`` (label → prompts) ran with 100 % identical answers, KV lengths and
    (pruned methods) kept sets."""
    answers, kv, kept = shares(text, "identical answers"), shares(text, "KV length equal"), shares(text, "kept tokens equal")
    assert set(answers) == set(expected), (sorted(answers), text[-3000:])
    for label, n in expected.items():
        assert answers[label] == 100.0 and kv[label] == 100.0, (label, text[-3000:])
        assert f"[{label}] identical answers: 100.0 %  ({n}/{n})" in text
        if label != "none":
            assert kept[label] == 100.0, (label, text[-3000:])


def test_parity_grounder_methods_and_patterns(suite):
    text = section(suite, "grounder")
    check_parity(text, {"ivc_prune {}": 50, 'random {"keep_ratio": 0.3}': 10, 'ivc_prune {"pattern": "corners"}': 5,
                        'ivc_prune {"pattern": "window"}': 5, 'ivc_prune {"pattern": "diagonal"}': 5,
                        'ivc_prune {"pattern": "random"}': 5,
                        'ivc_prune {"pattern": "window", "use_foreground": false}': 5, "drop_ivc {}": 10,
                        'ivc_prune {"use_foreground": false}': 5, "none": 10})


def test_parity_qwen2_vl(suite):
    check_parity(section(suite, "qwen2_vl"), {"ivc_prune {}": 10, 'random {"keep_ratio": 0.3}': 5, "none": 5})


def test_parity_qwen3_vl_deepstack(suite):
    check_parity(section(suite, "qwen3_vl"), {"ivc_prune {}": 50, 'ivc_prune {"selection_layer": 1}': 10,
                                              'random {"keep_ratio": 0.3}': 5, "drop_ivc {}": 10, "none": 5})


def test_per_request_errors(suite):
    text = section(suite, "grounder")
    assert "ok request_errors" in text, text[-3000:]
    assert text.count("request error") == 5 and "WRONG" not in text


def test_plugin_off_is_plain_vllm(suite):
    check_parity(section(suite, "plugin_off"), {"none": 5})


def test_clear_errors(suite):
    text = section(suite, "checks")
    for name in ("names_and_params", "refused_methods", "kept_counts", "position_counts", "engine_settings",
                 "request_specs"):
        assert f"ok {name}" in text


def test_vllm_serve_matches_offline(suite):
    text = section(suite, "serve")
    assert "serve: every answer equal to offline LLM" in text
    assert text.count("same: server") == 4, text[-3000:]
    assert text.count("(random): same") == 1 and text.count("(drop_ivc): same") == 2, text[-3000:]  # per request
    assert "bad method: ok" in text, text[-3000:]


def test_bench_engine_vllm_refuses_bad_input(tmp_path, capsys):
    from ivcp.cli import main

    assert main(["bench", "--engine", "vllm", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "is not a model folder" in err and err.strip().count("\n") == 0
    for args, says in ((["--kv-blocks", "12"], "give at least 16 blocks"), (["--repeats", "0"], "repeats must be at least 1"),
                       (["--requests", "0"], "requests must be at least 1")):
        assert main(["bench", "--engine", "vllm", "--model", "tiny", *args]) != 0
        err = capsys.readouterr().err
        assert says in err and err.strip().count("\n") == 0, err


def test_bench_engine_vllm_counts_what_the_scheduler_reserves(tmp_path):
    """``ivcp bench --engine vllm`` on the tiny grounder: prompt tokens, KV blocks per request and requests that
    fit the budget, against the same quantities worked from transformers' processor (each image keeps
    round(0.5·N) of its N merged tokens; a request holds ⌈(prompt + 4 generated) / 32⌉ blocks)."""
    if _REASON is not None:
        pytest.skip(_REASON)
    import json
    import math
    import sys

    from transformers import AutoProcessor

    from ivcp.vllm.folder import serving_folder
    from ivcp.vllm.prompts import prompt_text, prompts

    folder = serving_folder(tmp_path / "grounder")
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "ivcp", "bench", "--engine", "vllm", "--model", str(folder),
                           "--requests", "6", "--kv-blocks", "20", "--new-tokens", "4", "--repeats", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false"))
    assert done.returncode == 0, done.stderr[-3000:]
    vanilla, pruned = json.loads((out / "bench.json").read_text())["rows"]
    assert (vanilla["method"], pruned["method"]) == ("vanilla", "ivc_prune")
    processor = AutoProcessor.from_pretrained(folder)
    full, kept = [], []
    for sample in prompts(6, 11):  # the bench's prompts (seed 11)
        inputs = processor(text=[prompt_text(processor, sample["expression"], len(sample["images"]))],
                           images=sample["images"], return_tensors="pt")
        sizes = [t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
        full.append(inputs["input_ids"].shape[1])
        kept.append(full[-1] - sum(n - round(0.5 * n) for n in sizes))
    blocks = lambda lengths: [math.ceil((length + 4) / 32) for length in lengths]  # noqa: E731
    for row, lengths in ((vanilla, full), (pruned, kept)):
        assert row["mean_prompt_tokens"] == pytest.approx(sum(lengths) / 6)
        assert row["kv_blocks_per_request"] == pytest.approx(sum(blocks(lengths)) / 6)
        assert row["requests_that_fit"] == 20 // max(blocks(lengths))
        assert len(row["round_seconds"]) == 2 and row["requests_per_s"] > 0
    assert pruned["analytic_prompt_ratio"] == pytest.approx(sum(kept) / sum(full))
    assert "median of 2 rounds" in (out / "bench.md").read_text()
