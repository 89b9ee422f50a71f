"""The README's main command (ivcp demo) and the method listing."""

import re
import subprocess
import sys

from ivcp.cli import main
from ivcp.testing import make_image, make_inputs, tiny_processor


def test_demo_table_kv_bytes_match_the_analytic_count(capsys):
    prompt = "Where is it?"
    assert main(["demo", "--layers", "4", "--width", "224", "--height", "168", "--max-new-tokens", "3",
                 "--prompt", prompt, "--methods", "ivc_prune,fastv"]) == 0
    out = capsys.readouterr().out
    n_prompt = make_inputs(tiny_processor(), prompt, images=[make_image(224, 168)])["input_ids"].shape[1]
    per_token = 2 * 2 * 16 * 4  # K and V x 2 kv heads x head_dim 16 x float32
    rows = {m.group(1): (m.group(2), int(m.group(3).replace(",", "")))
            for m in re.finditer(r"^(\w+)\s+(\d+/\d+)\s+([\d,]+)", out, re.M)}
    assert list(rows) == ["vanilla", "ivc_prune", "fastv"]
    assert rows["vanilla"] == ("48/48", 4 * n_prompt * per_token)
    # IVC-Prune at layer 2 of 4 keeps 24 of 48 everywhere; FastV keeps layers 0-1 full
    assert rows["ivc_prune"] == ("24/48", 4 * (n_prompt - 24) * per_token)
    assert rows["fastv"] == ("24/48", (2 * n_prompt + 2 * (n_prompt - 24)) * per_token)


def test_bad_method_is_a_clear_error(capsys):
    assert main(["demo", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_module_entry_point_lists_methods():
    out = subprocess.run([sys.executable, "-m", "ivcp", "methods"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^ivc_prune\s+IVC-Prune", out, re.M)


def test_models_lists_every_harness_name():
    from ivcp.eval.protocol import all_run_names

    out = main(["models"])
    assert out == 0
    out = subprocess.run([sys.executable, "-m", "ivcp", "models", "--family", "qwen2_vl"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    names = [line.split()[0] for line in out]
    assert names == [n for n, run in all_run_names().items() if run.model.family == "qwen2_vl"]
    assert "Qwen2-VL-7B-Instruct_IVCP_DatasetPrompt" in names
