"""A pruned model called the ways people call it: generation continued on the returned cache (more
tokens, new text, a second chat turn with a new image) is exactly one call and the masked no-cache
oracle; outside the block a pruned cache is refused; right padding, ``use_cache=False``, assisted
decoding and image features passed as embeddings are refused by name; ``labels`` give the loss over
the kept positions."""

import pytest
import torch

import ivcp
from ivcp.compat import CACHE_KWARG, output_cache
from ivcp.testing import make_batch_inputs, make_image, make_inputs

from conftest import get_model
from oracle import oracle_logits, record_stages, vscan_embedding_updates
from test_families import FAMILIES, METHODS

GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def _generate(model, inputs, steps, **kwargs):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, **GREEDY, **kwargs)


def _logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)[0]


def _extended(inputs: dict, input_ids: torch.Tensor, **fields) -> dict:
    """``inputs`` (the first prompt's) carried on to the longer ``input_ids``: no pixels (the cache holds
    them), a mask of ones, the token types extended as text."""
    feed = {k: v for k, v in inputs.items() if not k.startswith("pixel_values") and k != "image_sizes"}
    feed.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **fields)
    if "mm_token_type_ids" in inputs and "mm_token_type_ids" not in fields:
        types = inputs["mm_token_type_ids"]
        feed["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, input_ids.shape[1] - types.shape[1])], 1)
    return feed


def _oracle(model, session, inputs, record, generated, pictures=None):
    """The oracle's logits for ``generated`` after the prompt ``inputs`` (``pictures``: the vision inputs of
    the whole sequence, where later turns bring more)."""
    updates = vscan_embedding_updates(model, inputs, record) if session.method.name == "vscan" else None
    inputs = dict(inputs, **(pictures or {}))
    trimmed = set(session.method.trimmed_layers(record.stages[-1]["layer"]))
    return oracle_logits(model, inputs, generated, record_stages(record), trimmed, embedding_updates=updates,
                         renumber=getattr(session.method, "position_policy", "keep") == "renumber")


@pytest.mark.parametrize("family", FAMILIES)
def test_text_appended_by_hand_then_generate_match_the_oracle(family):
    """Several calls on one cache: generate, a hand-written forward of new text, generate again."""
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Which shape is red?", images=[make_image(seed=9)])
    extra = processor.tokenizer(" Answer again, briefly.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.3) as session:
        first = _generate(model, inputs, 4)
        record = session.last
        cache = output_cache(first)
        mask = torch.ones(1, first.sequences.shape[1] + extra.shape[1] - 1, dtype=torch.long)
        model(input_ids=torch.cat([first.sequences[:, -1:], extra[:, :-1]], 1), attention_mask=mask, use_cache=True,
              **{CACHE_KWARG: cache})
        ids = torch.cat([first.sequences, extra], 1)
        second = _generate(model, _extended(inputs, ids), 5, **{CACHE_KWARG: cache})
    assert session.last is record  # no new prefill: the selection is the first prompt's
    generated = second.sequences[0, inputs["input_ids"].shape[1]:]
    expected = _oracle(model, session, inputs, record, generated)
    torch.testing.assert_close(_logits(first), expected[:4], atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(second), expected[-5:], atol=1e-4, rtol=0)


def _second_turn(model, processor, inputs, sequences):
    """The first turn's tokens, then a new user turn with a new picture: (the generate inputs on top of the
    cache: the new picture's pixels only; the oracle's inputs: both pictures)."""
    turn = make_inputs(processor, "And in this one?", images=[make_image(160, 112, seed=7)])
    ids = torch.cat([sequences, turn["input_ids"]], 1)
    fields, both = {}, {}
    for key, value in turn.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key == "mm_token_type_ids":
            gap = value.new_zeros(1, sequences.shape[1] - inputs[key].shape[1])
            fields[key] = both[key] = torch.cat([inputs[key], gap, value], 1)
        else:
            fields[key], both[key] = value, torch.cat([inputs[key], value])
    feed = dict(fields, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "image_grid_thw" in both:  # M-RoPE: generate cannot number a later turn's picture itself
        from oracle import _rope_args

        feed["position_ids"], _ = model.model.get_rope_index(**_rope_args(model, dict(both, input_ids=ids,
                                                                                       attention_mask=feed["attention_mask"])))
    return feed, both


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_continued_generation_is_one_call_and_the_oracle(family, method):
    """8 tokens, then 12 more from the returned cache, equal 20 tokens in one call (greedy, float32); a
    second chat turn with a new picture on the 20 tokens' cache (the picture runs unpruned on top of it)
    decodes as the oracle says, which hides the first picture's dropped tokens as the selection decided."""
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Where is the largest shape? Answer briefly.", images=[make_image(seed=4)])
    with torch.no_grad(), ivcp.prune(model, method) as session:
        one = _generate(model, inputs, 20)
        record = session.last
        assert record.n_visual_kept < record.n_visual
        first = _generate(model, inputs, 8)
        cache = output_cache(first)
        assert cache.get_seq_length() == first.sequences.shape[1] - 1  # the unpruned length it stands for
        rest = _generate(model, _extended(inputs, first.sequences), 12, **{CACHE_KWARG: cache})
        feed, pictures = _second_turn(model, processor, inputs, one.sequences)
        turn = _generate(model, feed, 4, **{CACHE_KWARG: output_cache(one)})
    assert torch.equal(rest.sequences, one.sequences)
    torch.testing.assert_close(_logits(rest), _logits(one)[8:], atol=1e-5, rtol=0)
    generated = turn.sequences[0, inputs["input_ids"].shape[1]:]
    expected = _oracle(model, session, inputs, record, generated, pictures)
    torch.testing.assert_close(_logits(one), expected[:20], atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(turn), expected[-4:], atol=1e-4, rtol=0)


def test_a_pruned_cache_is_refused_outside_the_block():
    model, processor = get_model("qwen2_5_vl")
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=4)])
    with torch.no_grad():
        with ivcp.prune(model, "ivc_prune") as session:
            first = _generate(model, inputs, 3)
        cache = output_cache(first)
        stored = [layer.keys.shape[-2] for layer in cache.layers]  # the prompt's kept entries, 2 decoded tokens
        assert stored == [n + 2 for n in session.last.cache_lengths] and stored[0] < first.sequences.shape[1] - 1
        with pytest.raises(ValueError, match="inside an `ivcp.prune` block"):
            _generate(model, _extended(inputs, first.sequences), 3, **{CACHE_KWARG: cache})
        with pytest.raises(ValueError, match="inside an `ivcp.prune` block"):
            model(input_ids=first.sequences[:, -1:], use_cache=True, **{CACHE_KWARG: cache})
        with ivcp.prune(model, "ivc_prune"):  # back inside a block, it continues
            rest = _generate(model, _extended(inputs, first.sequences), 3, **{CACHE_KWARG: cache})
    assert rest.sequences.shape[1] == first.sequences.shape[1] + 3


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_right_padding_is_refused_naming_left_padding(family):
    from test_batch import three_rows

    model, processor = get_model(family)
    batch = make_batch_inputs(processor, three_rows(), padding_side="right")
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=1.0):
        with pytest.raises(ValueError, match=r'left padding \(processor.tokenizer.padding_side = "left"'):
            _generate(model, batch, 2)
        short = [b for b in range(3) if batch["attention_mask"][b, -1] == 0]
        assert len(short) == 2
        with pytest.raises(ValueError, match=rf"rows \[{short[0]}, {short[1]}\] of the batch have padding after real"):
            model(**batch)


def test_generation_without_the_cache_is_refused():
    """use_cache=False would choose again at every step from the grown text: refused, as the docs say."""
    from transformers import GenerationConfig

    model, processor = get_model("qwen2_5_vl")
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=4)])
    with torch.no_grad(), ivcp.prune(model, "fastv") as session:
        with pytest.raises(ValueError, match="use_cache=False"):
            _generate(model, inputs, 3, use_cache=False)
        with pytest.raises(ValueError, match="use_cache=False"):
            _generate(model, inputs, 3, generation_config=GenerationConfig(use_cache=False))
        with pytest.raises(ValueError, match="prefill_chunk_size is not supported"):  # a prefill in pieces
            _generate(model, inputs, 3, prefill_chunk_size=16)
        model(**inputs, use_cache=False)  # one forward without a cache is one prefill: fine
    assert len(session.records) == 1


@pytest.mark.parametrize("option", [dict(prompt_lookup_num_tokens=3), "assistant"])
@pytest.mark.parametrize("method", ["fastv", "ivc_prune"])
def test_assisted_and_prompt_lookup_decoding_are_refused(method, option):
    model, processor = get_model("qwen2_5_vl")
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=4)])
    option = dict(assistant_model=get_model("qwen2_5_vl", "eager")[0]) if option == "assistant" else option
    with torch.no_grad(), ivcp.prune(model, method):
        with pytest.raises(ValueError, match="assisted or prompt-lookup decoding"):
            model.generate(**inputs, max_new_tokens=4, do_sample=False, **option)


def test_image_features_as_embeddings_without_pixels_are_refused():
    """Embeddings with the picture's features merged in (no pixels, no input_ids): nothing could be pruned."""
    model, processor = get_model("qwen2_5_vl")
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=4)])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features = torch.cat(list(getattr(features, "pooler_output", features)))
        visual = inputs["input_ids"][0] == model.config.image_token_id
        embeds[0, visual] = features.to(embeds.dtype)
        feed = dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        with ivcp.prune(model, "ivc_prune") as session:
            with pytest.raises(ValueError, match="image features merged into embeddings cannot be pruned"):
                model.generate(**feed, max_new_tokens=2)
            with pytest.raises(ValueError, match="pass input_ids"):
                model(**feed)
    assert session.last is None and session.records == []


def _loss_by_hand(logits, labels, kept_rows, padding):
    """Mean cross-entropy of each kept token's logit against the label of the token after it."""
    total, count = 0.0, 0
    for b, kept in enumerate(kept_rows):
        row_logits = logits[b, logits.shape[1] - kept.numel():]
        for column, token in enumerate(kept.tolist()):
            if token + 1 < labels.shape[1] and labels[b, token + 1] != -100:
                total = total + torch.nn.functional.cross_entropy(row_logits[column].float(), labels[b, token + 1])
                count += 1
    return total / count


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "internvl"])
def test_labels_give_the_loss_over_the_kept_positions(family):
    from test_batch import three_rows

    model, processor = get_model(family)
    adapter = ivcp.adapters.adapter_for(model)
    batch = make_batch_inputs(processor, three_rows())
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(torch.isin(labels, torch.tensor(sorted(adapter.marker_token_ids))), -100)
    first = batch["attention_mask"].argmax(1)  # the unpruned model scores the last pad's logit against it: not ivcp
    labels[torch.arange(3), first] = -100
    with torch.no_grad():
        bare = model(**batch, labels=labels)
        with ivcp.prune(model, "ivc_prune", keep_ratio=1.0):  # nothing pruned: the model's own loss
            same = model(**batch, labels=labels)
        with ivcp.prune(model, "ivc_prune", keep_ratio=0.3) as session:
            pruned = model(**batch, labels=labels)
            plain = model(**batch)
    torch.testing.assert_close(same.loss, bare.loss, atol=1e-5, rtol=0)
    assert torch.equal(pruned.logits, plain.logits) and plain.loss is None
    assert pruned.logits.shape[1] < batch["input_ids"].shape[1]
    expected = _loss_by_hand(pruned.logits, labels, [r.kept for r in session.last], [r.padding for r in session.last])
    torch.testing.assert_close(pruned.loss, expected, atol=1e-5, rtol=0)
    assert (pruned.loss - bare.loss).abs() > 1e-4


def test_internvl_image_sizes_that_contradict_the_tokens_are_refused():
    model, processor = get_model("internvl")
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(224, 168, seed=4)])
    with torch.no_grad(), ivcp.prune(model, "ivc_prune") as session:
        model(**inputs)  # the processor's own sizes: 3 x 2 tiles and a thumbnail
        assert {s.layout for s in ivcp.adapters.adapter_for(model).segments(inputs["input_ids"][0],
                                                                            image_sizes=inputs["image_sizes"])} == {(2, 3)}
        # a square gives 1, 4, 9… tiles; twice as wide, 3 x 1 or 5 x 2 or… but never 6 (a 10x wider one can:
        # 6 x 1 tiles under a maximum of 6, so its sizes are not refused)
        for wrong in ([224, 224], [168, 448]):
            with pytest.raises(ValueError, match="cannot give its 7 tiles"):
                model(**dict(inputs, image_sizes=torch.tensor([wrong])))
    assert len(session.records) == 1


def test_internvl_square_sizes_are_checked_with_the_towers_tile_size():
    """The check breaks InternVL's layout ties with the tower's own tile side (64 px on the tiny model): a
    224 x 224 picture is 2 x 2 tiles and a thumbnail there (at 448-px tiles it would be one tile)."""
    from ivcp.adapters.internvl import check_tile_count

    model, processor = get_model("internvl")
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(224, 224, seed=4)])
    assert inputs["input_ids"].eq(model.config.image_token_id).sum() == 5 * 16  # the processor: 4 tiles + thumbnail
    with torch.no_grad(), ivcp.prune(model, "ivc_prune") as session:
        model(**inputs)  # refused before the tile side was taken into account
    assert session.last.n_visual == 5 * 16
    segments = ivcp.adapters.adapter_for(model).segments(inputs["input_ids"][0], image_sizes=inputs["image_sizes"])
    assert {s.layout for s in segments} == {(2, 2)}
    check_tile_count((224, 224), 5, tile_size=64)
    with pytest.raises(ValueError, match="cannot give its 5 tiles"):
        check_tile_count((224, 224), 5, tile_size=448)


def test_every_prefill_is_recorded_compactly():
    import json

    model, processor = get_model("qwen2_5_vl")
    one = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=4)])
    two = make_inputs(processor, "Say hello.")
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.25) as session:
        first = _generate(model, one, 3)
        model(**two)
        _generate(model, _extended(one, first.sequences), 2, **{CACHE_KWARG: output_cache(first)})  # no prefill
    assert len(session.records) == 2 and session.records[-1] is session.last
    assert session.records[0].n_visual_kept == 12 and session.records[1].n_visual == 0
    text = repr(session.records[0])
    assert "tensor" not in text and len(text) < 400 and "12/48" in text
    data = json.loads(json.dumps(session.records[0].to_dict()))
    row = data["rows"][0]
    assert row["kept"] == session.records[0].kept.tolist()
    assert row["stages"][0]["kept"] == session.records[0].stages[0]["kept"].tolist()
    assert data["cache_lengths"] == session.records[0].cache_lengths
    assert data["method"]["method"] == "ivc_prune" and data["method"]["keep_ratio"] == 0.25
