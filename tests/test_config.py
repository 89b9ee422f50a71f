"""Defaults from configs/ and bad configuration caught before any compute."""

import pytest
import torch

import ivcp
from ivcp.config import method_defaults

from conftest import get_model


@pytest.mark.parametrize("family,layers,hidden,expected", [
    ("qwen2_5_vl", 28, 3584, 16),  # 7B reference
    ("qwen2_5_vl", 36, 2048, 22),  # 3B
    ("qwen2_5_vl", 64, 5120, 35),  # 32B
    ("qwen2_vl", 28, 3584, 16),  # Qwen2-VL-7B, by the 7B depth fraction
    ("qwen2_5_vl", 4, 64, 2),  # unlisted size: round(16/28 * 4)
    ("qwen2_5_vl", 1 + 1, 64, 1),  # clamped to a valid layer
])
def test_selection_layer_defaults(family, layers, hidden, expected):
    assert method_defaults(family, "ivc_prune", layers, hidden)["selection_layer"] == expected


def test_resolved_method_takes_config_then_explicit_values():
    model, _ = get_model("qwen2_5_vl")
    method = ivcp.resolve_method(model, "ivc_prune")
    assert (method.selection_layer, method.ivc_ratio, method.keep_ratio, method.foreground_ratio) == (2, 0.10, 0.5, 0.40)
    method = ivcp.resolve_method(model, "ivc_prune", selection_layer=3, ivc_ratio=0.2)
    assert (method.selection_layer, method.ivc_ratio) == (3, 0.2)
    assert ivcp.resolve_method(model, "fastv").selection_layer == 2


@pytest.mark.parametrize("method,params,message", [
    ("ivc_prune", dict(selection_layer=4), "selection layer 4 is out of range for a model with 4 layers"),
    ("ivc_prune", dict(selection_layer=0), "selection layer 0 is out of range"),
    ("fastv", dict(selection_layer=7), "out of range"),
    ("ivc_prune", dict(keep_ratio=1.5), "keep_ratio must be in \\[0, 1\\]"),
    ("ivc_prune", dict(ivc_ratio=-0.1), "ivc_ratio must be in \\[0, 1\\]"),
    ("random", dict(keep_ratio="half"), "keep_ratio must be in"),
    ("ivc_prune", dict(ivc_mode="diagonal"), "ivc_mode must be one of"),
    ("ivc_prune", dict(budget_mode="max"), "budget_mode must be one of"),
    ("ivc_prune", dict(keep=0.5), "unknown parameter\\(s\\) keep"),
    ("no_such_method", {}, "unknown method 'no_such_method'"),
])
def test_bad_configuration_raises_before_compute(method, params, message):
    model, processor = get_model("qwen2_5_vl")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            with ivcp.prune(model, method, **params):
                model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert calls == []


def test_unsupported_model_is_named():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_only = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model: Qwen2ForCausalLM \\(model_type='qwen2'\\)"):
        with ivcp.prune(text_only, "ivc_prune"):
            pass


def test_method_object_is_accepted_and_nesting_is_refused():
    model, _ = get_model("qwen2_5_vl")
    method = ivcp.make_method("ivc_prune", keep_ratio=0.3)
    with ivcp.prune(model, method) as session:
        assert session.method.keep_ratio == 0.3 and session.method.selection_layer == 2
        with pytest.raises(ValueError, match="already inside an ivcp.prune block"):
            with ivcp.prune(model, "fastv"):
                pass
    with ivcp.prune(model, "fastv"):  # usable again after the block
        pass


def test_available_methods_lists_the_core_methods():
    assert {"ivc_prune", "fastv", "random"} <= set(ivcp.available_methods())


def test_pdrop_positions_per_family():
    """PDrop renumbers positions where its own code defines it (LLaVA, 1-D RoPE) and keeps the M-RoPE ids
    elsewhere; the harness's _PDrop entries take these family defaults."""
    from ivcp.eval.protocol import all_run_names

    assert ivcp.resolve_method(get_model("llava")[0], "pdrop").position_policy == "renumber"
    assert ivcp.resolve_method(get_model("qwen2_5_vl")[0], "pdrop").position_policy == "keep"
    runs = all_run_names()
    assert "position_policy" not in runs["Qwen2.5-VL-7B-Instruct_PDrop"].method_params
