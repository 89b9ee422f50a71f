"""The engine on tiny real-architecture models: identity at keep_ratio 1, exact pruned decoding
against the masked no-cache oracle, KV lengths, positions, segments, hooks removed."""

import pytest
import torch

import ivcp
from ivcp.compat import CACHE_KWARG, output_cache
from ivcp.testing import make_image, make_inputs

from conftest import get_model
from oracle import oracle_logits, record_stages, trimmed_layers

ATTN = ["sdpa", "eager"]


def _generate(model, inputs, steps=6, sample=False):
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=sample,
                         top_k=0 if sample else None, top_p=1.0 if sample else None, temperature=1.0 if sample else None,
                         output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[0, inputs["input_ids"].shape[1]:]
    return generated, torch.stack(out.logits, dim=1)[0]


@pytest.mark.parametrize("attn", ATTN)
def test_keep_all_is_identity(family, attn):
    model, processor = get_model(family, attn)
    inputs = make_inputs(processor, "What is shown?", images=[make_image()])
    with torch.no_grad():
        bare_logits = model(**inputs).logits
        bare_tokens, _ = _generate(model, inputs)
        with ivcp.prune(model, "ivc_prune", keep_ratio=1.0) as session:
            logits = model(**inputs).logits
            tokens, _ = _generate(model, inputs)
    assert session.last.n_visual_kept == session.last.n_visual == 48
    assert torch.equal(logits, bare_logits)
    assert torch.equal(tokens, bare_tokens)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("method,params", [
    ("ivc_prune", dict(keep_ratio=0.4)),
    ("ivc_prune", dict(keep_ratio=0.25, selection_layer=1, ivc_mode="sectioned")),
    ("fastv", dict(keep_ratio=0.3)),
    ("random", dict(keep_ratio=0.5, selection_layer=3)),
])
def test_pruned_decoding_matches_masked_oracle(family, attn, method, params):
    model, processor = get_model(family, attn)
    inputs = make_inputs(processor, "Where is the red square? Answer briefly.", images=[make_image()])
    with torch.no_grad(), ivcp.prune(model, method, **params) as session:
        generated, logits = _generate(model, inputs)
    record = session.last
    expected = oracle_logits(model, inputs, generated, record_stages(record), trimmed_layers(session))
    assert record.n_visual_kept < record.n_visual
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    # the pruned run really differs from the unpruned one (the oracle is not trivially equal)
    bare = oracle_logits(model, inputs, generated, [(1, torch.arange(inputs["input_ids"].shape[1]))], False)
    assert (bare - logits).abs().max() > 1e-3


def test_sampling_decode_matches_masked_oracle(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Tell a story about it.", images=[make_image(seed=7)])
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.3) as session:
        generated, logits = _generate(model, inputs, steps=8, sample=True)
    expected = oracle_logits(model, inputs, generated, record_stages(session.last), True)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_manual_decode_without_position_ids_uses_unpruned_positions(family):
    """A hand-written decode loop passes neither position ids nor a mask: transformers would derive
    positions from the (shorter) cache; the engine must restore the unpruned positions."""
    model, processor = get_model(family, "sdpa")
    inputs = make_inputs(processor, "Name the colours.", images=[make_image(seed=2)])
    steps, tokens, logits = 4, [], []
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.3) as session:
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = model(input_ids=nxt, **{CACHE_KWARG: cache}, use_cache=True)
            logits.append(out.logits[0, -1])
    generated = torch.cat(tokens, dim=1)[0]
    # logits after feeding generated[i] are the oracle's at prompt + i + 1 tokens; one extra token
    # (never attended, causal) makes the oracle return that many rows
    extended = torch.cat([generated, generated[-1:]])
    expected = oracle_logits(model, inputs, extended, record_stages(session.last), True)
    torch.testing.assert_close(torch.stack(logits), expected[1:], atol=1e-4, rtol=0)


def test_kv_lengths_per_policy(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Describe.", images=[make_image()])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with ivcp.prune(model, "ivc_prune", keep_ratio=0.5, selection_layer=2) as ivc:
            cache = output_cache(model(**inputs, use_cache=True))
        kept = ivc.last.kept.numel()
        assert [layer.keys.shape[-2] for layer in cache.layers] == [kept] * 4 == ivc.last.kv_lengths
        assert [layer.values.shape[-2] for layer in cache.layers] == [kept] * 4
        assert ivc.last.visual_kv_share == pytest.approx(ivc.last.n_visual_kept / ivc.last.n_visual)
        with ivcp.prune(model, "fastv", keep_ratio=0.5, selection_layer=2) as fastv:
            cache = output_cache(model(**inputs, use_cache=True))
        kept = fastv.last.kept.numel()
        assert [layer.keys.shape[-2] for layer in cache.layers] == [n, n, kept, kept] == fastv.last.kv_lengths
        assert fastv.last.visual_kv_share == pytest.approx((2 * 48 + 2 * 24) / (4 * 48))


def test_kept_holds_all_text_and_the_budget(family, model_and_processor, one_image_inputs):
    model, _ = model_and_processor
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.5) as session:
        model(**one_image_inputs)
    record = session.last
    (start, end), = record.segments
    n = one_image_inputs["input_ids"].shape[1]
    text = torch.cat([torch.arange(0, start), torch.arange(end, n)])
    assert torch.isin(text, record.kept).all()
    assert record.n_visual == end - start == 48
    assert record.n_visual_kept == round(0.5 * 48) == ((record.kept >= start) & (record.kept < end)).sum()
    assert torch.equal(record.kept, torch.sort(record.kept).values)


def test_two_images_and_video_prune_per_segment(family):
    model, processor = get_model(family)
    images = [make_image(224, 168, seed=1), make_image(112, 112, seed=2)]
    inputs = make_inputs(processor, "Compare them.", images=images, video_frames=4)
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.5) as session:
        generated, logits = _generate(model, inputs, steps=3)
    record = session.last
    sizes = [end - start for start, end in record.segments]
    # 224x168 -> 8x6 merged, 112x112 -> 4x4, video 112x84: 2 temporal slices of 4x3
    assert sizes == [48, 16, 12, 12]
    for start, end in record.segments:
        kept_here = int(((record.kept >= start) & (record.kept < end)).sum())
        assert kept_here == round(0.5 * (end - start))
    expected = oracle_logits(model, inputs, generated, record_stages(record), True)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_text_only_prompt_runs_unpruned(family, model_and_processor):
    model, processor = model_and_processor
    inputs = make_inputs(processor, "Just text, no picture.")
    with torch.no_grad():
        bare = model(**inputs).logits
        with ivcp.prune(model, "ivc_prune") as session:
            logits = model(**inputs).logits
    assert torch.equal(bare, logits)
    assert session.last.segments == [] and session.last.n_visual == 0


def test_hooks_removed_and_model_unchanged(family, model_and_processor, one_image_inputs):
    model, _ = model_and_processor
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():
        bare = model(**one_image_inputs).logits
        with ivcp.prune(model, "ivc_prune"):
            model(**one_image_inputs)
        after = model(**one_image_inputs).logits
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(bare, after)
    assert "generate" not in vars(model)  # the checked generate is gone with the block


def test_beam_search_is_refused_by_name(model_and_processor, one_image_inputs):
    model, _ = model_and_processor
    with ivcp.prune(model, "ivc_prune"), pytest.raises(ValueError, match="does not support beam search"):
        model.generate(**one_image_inputs, num_beams=2, max_new_tokens=2)


def test_image_as_embeddings_is_refused(model_and_processor, one_image_inputs):
    model, _ = model_and_processor
    embeds = model.get_input_embeddings()(one_image_inputs["input_ids"])
    feed = {k: v for k, v in one_image_inputs.items() if k != "input_ids"}
    with ivcp.prune(model, "fastv") as session, pytest.raises(ValueError, match="pass input_ids"):
        model.generate(inputs_embeds=embeds, **feed, max_new_tokens=2)
    assert session.last is None


@pytest.mark.parametrize("method", sorted(ivcp.available_methods()))
def test_every_image_keeps_a_token(method):
    """A 1-token image beside a 48-token one: every method keeps at least one of its tokens."""
    from ivcp.testing import tiny_processor

    model, _ = get_model("qwen2_5_vl")
    processor = tiny_processor("qwen2_5_vl", min_pixels=28 * 28)
    inputs = make_inputs(processor, "Which picture is brighter?", images=[make_image(28, 28, seed=2), make_image()])
    params = {"keep_ratio": 0.1} if method in ("fastv", "window_fastv", "random", "adaptprune") else {}
    with torch.no_grad(), ivcp.prune(model, method, **params) as session:
        model(**inputs)
    small, large = session.last.segments
    assert small[1] - small[0] == 1 and large[1] - large[0] == 48
    kept = session.last.kept
    assert ((kept >= small[0]) & (kept < small[1])).sum() == 1
    assert ((kept >= large[0]) & (kept < large[1])).sum() >= 1

