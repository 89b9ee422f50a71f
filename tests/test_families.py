"""Every registered method on every model family, with the family's own defaults (configs/models),
decodes exactly like the masked no-cache oracle of the unpruned model; attention rows computed by
the engine equal the model's own eager attention."""

import pytest
import torch

import ivcp
from ivcp.config import authors_params
from ivcp.testing import make_image, make_inputs

from conftest import get_model
from oracle import oracle_logits, record_stages, trimmed_layers, vscan_embedding_updates

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava", "qwen3_vl", "qwen3_vl_moe", "internvl", "internvl_llama"]
METHODS = sorted(ivcp.available_methods())


def _decode_like_the_oracle(model, inputs, method, params, steps=4):
    with torch.no_grad(), ivcp.prune(model, method, **params) as session:
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    generated = out.sequences[0, inputs["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, dim=1)[0]
    record = session.last
    assert 0 < record.n_visual_kept < record.n_visual, (method, params)
    updates = vscan_embedding_updates(model, inputs, record) if session.method.name == "vscan" else None
    expected = oracle_logits(model, inputs, generated, record_stages(record), trimmed_layers(session),
                             embedding_updates=updates,
                             renumber=getattr(session.method, "position_policy", "keep") == "renumber")
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    return session


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_with_family_defaults_matches_the_oracle(family, method, attn):
    model, processor = get_model(family, attn)
    inputs = make_inputs(processor, "Where is the largest shape? Answer briefly.", images=[make_image(seed=4)])
    _decode_like_the_oracle(model, inputs, method, {})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_authors_settings_match_the_oracle(family):
    model, processor = get_model(family)
    params = authors_params(ivcp.adapters.adapter_for(model).family, "ivc_prune")
    assert params, f"{family} has no [authors.ivc_prune] in its config"
    inputs = make_inputs(processor, "Which shape is red? Answer with its name.", images=[make_image(seed=9)])
    session = _decode_like_the_oracle(model, inputs, "ivc_prune", params)
    if not params.get("trim_layer0_kv", True):  # layer 0 keeps every token, the layers before K do not
        lengths = session.last.kv_lengths
        assert lengths[0] == inputs["input_ids"].shape[1] and lengths[1] < lengths[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_the_unpruned_model(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "What is shown?", images=[make_image()])
    with torch.no_grad():
        bare = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with ivcp.prune(model, "ivc_prune", keep_ratio=1.0) as session:
            pruned = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert session.last.n_visual_kept == session.last.n_visual > 0
    assert torch.equal(bare, pruned)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rows_equal_the_models_eager_attention(family):
    """``SelectionContext.attention`` (from q and the cached keys) against the probabilities the model's
    own eager attention computes at the same layer."""
    model, processor = get_model(family, "eager")
    inputs = make_inputs(processor, "Where is the blue circle?", images=[make_image(seed=6)])
    layer = 2
    captured, rows = {}, {}
    attention = ivcp.adapters.adapter_for(model).attention(ivcp.adapters.adapter_for(model).layers[layer - 1])

    def grab(module, args, out):
        captured.setdefault("probs", out[1])

    handle = attention.register_forward_hook(grab)

    class Probe(ivcp.methods.fastv.FastV):
        def select(self, ctx):
            visual = ctx.visual_tokens()
            queries = torch.tensor([ctx.last_token, int(visual[0]), int(visual[-1]) + 1])
            rows["probs"] = ctx.attention(queries, ctx.alive)[0]  # (heads, 3, S)
            rows["queries"] = queries
            return visual

    try:
        with torch.no_grad(), ivcp.prune(model, Probe(selection_layer=layer)):
            model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    expected = captured["probs"][0][:, rows["queries"]]  # (heads, 3, S)
    torch.testing.assert_close(rows["probs"], expected.float(), atol=1e-5, rtol=0)
