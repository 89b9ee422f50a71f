"""Method parameters are checked when a method is built (base class, from the fields' types and documented
ranges), and ``ivcp methods --explain`` states each baseline's sources and deviations."""

import pytest

import ivcp
from ivcp.cli import main
from ivcp.methods.vscan import VScan


@pytest.mark.parametrize("method,params,message", [
    ("vscan", dict(window=0), "vscan: parameter window must be >= 1, got 0"),
    ("vscan", dict(llm_rotary="false"), "vscan: parameter llm_rotary must be a bool (true / false), got 'false'"),
    ("vscan", dict(llm_rotary=0), "vscan: parameter llm_rotary must be a bool"),
    ("vscan", dict(window=2.5), "vscan: parameter window must be an int, got 2.5"),
    ("vscan", dict(encoder_keep_ratio="0.5"), "vscan: parameter encoder_keep_ratio must be in [0, 1], got '0.5'"),
    ("vscan", dict(selection_layer=True), "vscan: parameter selection_layer must be an int"),
    ("window_fastv", dict(window_size=1), "window_fastv: parameter window_size must be >= 2, got 1"),
    ("adaptprune", dict(spatial_sigma=0), "adaptprune: parameter spatial_sigma must be > 0, got 0"),
    ("pdrop", dict(stage_ratios=(0.5, "x")), "pdrop: parameter stage_ratios must be in [0, 1], got (0.5, 'x')"),
    ("pdrop", dict(stage_layers=(8, 16.0)), "pdrop: parameter stage_layers must be a tuple whose items are each an int"),
    ("pdrop", dict(position_policy=1), "pdrop: position_policy must be one of"),
    ("random", dict(seed="3"), "random: parameter seed must be an int, got '3'"),
])
def test_bad_parameters_are_refused_when_built(method, params, message):
    with pytest.raises(ValueError) as error:
        ivcp.make_method(method, **params)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_direct_construction_and_replacement_are_checked_too():
    with pytest.raises(ValueError, match="parameter window must be >= 1"):
        VScan(window=0)
    with pytest.raises(ValueError, match="parameter llm_rotary must be a bool"):
        ivcp.make_method(VScan(), llm_rotary="true")


def test_good_parameters_pass():
    # an int where a float is asked, a list where a tuple is asked, None left for the configs
    assert ivcp.make_method("vscan", encoder_keep_ratio=1, llm_rotary=True, local_block=3).local_block == 3
    assert ivcp.make_method("pdrop", stage_layers=[1, 2], stage_ratios=[0.5, 1]).stage_layers == (1, 2)
    assert ivcp.make_method("window_fastv", selection_layer=None).selection_layer is None
    for name in ivcp.available_methods():  # every default is valid
        ivcp.make_method(name)


def test_config_values_are_checked_as_they_fill_a_method():
    method = ivcp.make_method("vscan")
    with pytest.raises(ValueError, match="parameter window must be >= 1"):
        method.with_defaults({"window": 0})


@pytest.mark.parametrize("name,needles", [
    ("vscan", ["qwen2_5_vl_utils.py", "clip_encoder.py", "llava_arch.py", "modeling_llama_x.py", "Deviations",
               "llava [defaults.vscan]", "position_policy='renumber'"]),
    ("window_fastv", ["modeling_deepseek.py", "_find_best_divisor", "Deviations"]),
    ("pdrop", ["modeling_llama_pdrop.py", "renumber", "Deviations"]),
    ("adaptprune", ["adaptprune.py", "int(576 * ratio)", "Deviations"]),
])
def test_methods_explain_names_sources_and_deviations(capsys, name, needles):
    assert main(["methods", "--explain", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: ")
    for needle in needles:
        assert needle in out, needle


def test_methods_explain_unknown_name(capsys):
    assert main(["methods", "--explain", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
