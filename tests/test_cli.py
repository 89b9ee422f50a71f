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


# --- the command line as a newcomer meets it ------------------------------------------------------

import argparse  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from ivcp.cli import CommandError, build_parser, method_params  # noqa: E402

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _subcommands(parser, prefix=()):
    """(argv prefix, parser) for the top level and every subcommand, nested ones included."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _subcommands(child, prefix + (name,))


def test_help_of_every_command_loads_neither_torch_nor_transformers():
    commands = [list(prefix) for prefix, _ in _subcommands(build_parser())]
    code = ("import sys\nfrom ivcp.cli import main\n"
            f"for argv in {commands!r}:\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert len(commands) == 10  # ivcp, demo, viz, viz ivc, viz kept, bench, data, data make-grounding, methods, models


def test_every_option_has_help_text_and_shows_its_default():
    for prefix, parser in _subcommands(build_parser()):
        shown = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, (prefix, action.dest)
            if action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction):
                assert f"default: {action.default}" in " ".join(shown.split()), (prefix, action.dest)


BAD_ARGUMENTS = [  # one bad argument per command: exit 2 and a one-line message naming it
    ([], "required: COMMAND"),
    (["nope"], "invalid choice: 'nope'"),
    (["demo", "--layers", "x"], "--layers: invalid int value"),
    (["demo", "--family", "nope"], "unknown family 'nope'"),
    (["demo", "--methods", "ivc_prune", "--param", "keep_ratio=lots"], "keep_ratio takes a number, got 'lots'"),
    (["viz"], "required: PICTURE"),
    (["viz", "ivc", "--grid", "2000", "2000"], "--grid 2000 2000: each side must be in 1..256"),
    (["viz", "kept", "--methods", "ivc_prune,nope"], "unknown method 'nope'"),
    (["bench", "--batch-sizes", "0"], "--batch-sizes: expected comma-separated positive integers"),
    (["data"], "required: DATASET"),
    (["data", "make-grounding"], "required: --out"),
    (["methods", "--nope"], "unrecognized arguments: --nope"),
    (["models", "--family", "nope"], "unknown family 'nope'"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_exits_2_with_one_line(argv, message):
    run = subprocess.run([sys.executable, "-m", "ivcp", *argv], capture_output=True, text=True, env=ENV)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("ivcp") and message in lines[0], lines[0]


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`ivcp models | head`: the pipe closes before ivcp has written its ~120 kB."""
    proc = subprocess.Popen([sys.executable, "-m", "ivcp", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert first.startswith(b"Qwen2.5-VL-3B-Instruct")
    assert err == ""


def test_params_are_typed_by_the_methods_fields():
    params = method_params(["pdrop", "ivc_prune"], [("pdrop.stage_layers", "2,4,6"), ("stage_ratios", "0.5, 0.5,0.25"),
                                                    ("keep_ratio", "0.3"), ("use_foreground", "false"),
                                                    ("selection_layer", "none"), ("ivc_mode", "sectioned")])
    assert params == {"pdrop": {"stage_layers": (2, 4, 6), "stage_ratios": (0.5, 0.5, 0.25), "selection_layer": None},
                      "ivc_prune": {"keep_ratio": 0.3, "use_foreground": False, "selection_layer": None,
                                    "ivc_mode": "sectioned"}}
    assert method_params(["vscan"], [("local_block", "3"), ("global_block", "auto")]) == \
        {"vscan": {"local_block": 3, "global_block": "auto"}}
    assert method_params(["ivc_union"], [("base_params", '{"keep_ratio": 0.25}')]) == \
        {"ivc_union": {"base_params": {"keep_ratio": 0.25}}}
    for raw, message in [(("stage_layers", "2,x"), "pdrop.stage_layers takes an integer, got 'x'"),
                         (("fastv.keep_ratio", "0.3"), "'fastv' is not one of the methods asked for"),
                         (("pdrop.keep_ratio", "0.3"), "pdrop has no parameter 'keep_ratio'"),
                         (("nope", "1"), "has a parameter 'nope'"),
                         (("use_foreground", "maybe"), "takes true or false")]:
        with pytest.raises(CommandError, match=message):
            method_params(["pdrop", "ivc_prune"], [raw])


def test_demo_passes_a_tuple_parameter(capsys):
    """PDrop with stage_layers=1,2,3 and halving stages: 48 visual tokens end as 24, 12, then 6."""
    assert main(["demo", "--layers", "4", "--width", "224", "--height", "168", "--max-new-tokens", "1",
                 "--methods", "pdrop", "--param", "stage_layers=1,2,3", "--param", "stage_ratios=0.5,0.5,0.5"]) == 0
    rows = dict(re.findall(r"^(\w+)\s+(\d+/\d+)", capsys.readouterr().out, re.M))
    assert rows == {"vanilla": "48/48", "pdrop": "6/48"}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "internvl", "internvl_llama"])
def test_demo_runs_every_family(family, capsys):
    from ivcp.testing import tiny_model

    assert main(["demo", "--family", family, "--layers", "4", "--width", "224", "--height", "168",
                 "--max-new-tokens", "2", "--methods", "ivc_prune,fastv"]) == 0
    rows = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^(\w+)\s+(\d+)/(\d+)", capsys.readouterr().out, re.M)}
    model, processor = tiny_model(family, num_hidden_layers=4)
    ids = make_inputs(processor, "x", images=[make_image(224, 168)])["input_ids"]
    image_token = model.config.image_token_id
    n_visual = int((ids == image_token).sum())
    assert list(rows) == ["vanilla", "ivc_prune", "fastv"]
    assert rows["vanilla"] == (n_visual, n_visual)
    assert all(total == n_visual and 0 < kept < n_visual for kept, total in (rows["ivc_prune"], rows["fastv"]))
