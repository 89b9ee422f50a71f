"""Batched pruning: every row of a left-padded batch (rows with different image sizes, a row without
images, several images, a video) is pruned and decoded exactly as it is alone — the same kept tokens,
the same logits at every step — and as the masked no-cache oracle of the unpruned model says, on every
family with every method."""

import pytest
import torch

import ivcp
from ivcp.compat import CACHE_KWARG, output_cache
from ivcp.config import authors_params
from ivcp.testing import make_batch_inputs, make_image, make_inputs

from conftest import get_model
from oracle import oracle_logits, record_stages, vscan_embedding_updates
from test_families import FAMILIES, METHODS

STEPS = 4


def three_rows() -> list[dict]:
    """An image, a prompt without images, and a smaller image of another shape with a longer prompt."""
    return [dict(prompt="Where is the largest shape? Answer briefly.", images=[make_image(seed=4)]),
            dict(prompt="Say hello."),
            dict(prompt="What colour is the circle in this small picture? Name it.",
                 images=[make_image(160, 112, seed=7)])]


def _generate(model, inputs, method, params, sample=False):
    torch.manual_seed(0)
    with torch.no_grad(), ivcp.prune(model, method, **params) as session:
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=sample,
                             top_k=0 if sample else None, top_p=1.0 if sample else None,
                             temperature=1.0 if sample else None, output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, dim=1), out.sequences, session


def _oracle(model, inputs, generated, record, session):
    updates = vscan_embedding_updates(model, inputs, record) if session.method.name == "vscan" and record.stages else None
    return oracle_logits(model, inputs, generated, record_stages(record), trimmed_layers_of(session, record),
                         embedding_updates=updates,
                         renumber=getattr(session.method, "position_policy", "keep") == "renumber")


def trimmed_layers_of(session, record) -> set[int]:
    return set(session.method.trimmed_layers(record.stages[-1]["layer"])) if record.stages else set()


def check_rows_like_alone(model, processor, rows, method, params=None, sample=False):
    """The batch of ``rows`` against each row alone and against the oracle; returns the batch's session."""
    params = params or {}
    batch = make_batch_inputs(processor, rows)
    logits, sequences, session = _generate(model, batch, method, params, sample=sample)
    width = batch["input_ids"].shape[1]
    assert len(session.last) == len(rows)
    pruned_rows = 0
    for b, row in enumerate(rows):
        single = make_inputs(processor, **row)
        n = single["input_ids"].shape[1]
        record = session.last[b]
        assert record.padding == width - n
        assert torch.equal(batch["input_ids"][b, width - n:], single["input_ids"][0])
        generated = sequences[b, width:]
        if not sample:  # sampling draws for the whole batch at once: alone, a row draws other tokens
            alone_logits, alone_sequences, alone = _generate(model, single, method, params)
            assert torch.equal(generated, alone_sequences[0, n:])
            torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=0)
            mine, theirs = alone.last, record
            assert [(s - record.padding, e - record.padding) for s, e in theirs.segments] == mine.segments
            assert torch.equal(theirs.kept - record.padding, mine.kept)
            assert [st["layer"] for st in theirs.stages] == [st["layer"] for st in mine.stages]
            assert all(torch.equal(a["kept"] - record.padding, b_["kept"]) for a, b_ in zip(theirs.stages, mine.stages))
            assert {k: (v - record.padding).tolist() for k, v in theirs.marks.items()} == \
                {k: v.tolist() for k, v in mine.marks.items()}
            assert theirs.kv_lengths == mine.kv_lengths
            assert (theirs.n_visual, theirs.n_visual_kept) == (mine.n_visual, mine.n_visual_kept)
            record = mine
        shifted = _unpadded(session.last[b])
        expected = _oracle(model, single, generated, shifted, session)
        torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=0)
        pruned_rows += record.n_visual_kept < record.n_visual
    assert pruned_rows >= 1
    return session


def _unpadded(record):
    """The record with its indices in the row's own (unpadded) prompt."""
    import dataclasses

    p = record.padding
    return dataclasses.replace(record, segments=[(s - p, e - p) for s, e in record.segments], kept=record.kept - p,
                               stages=[dict(st, kept=st["kept"] - p) for st in record.stages],
                               marks={k: v - p for k, v in record.marks.items()}, padding=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_prunes_each_row_as_alone(family, method):
    model, processor = get_model(family)
    check_rows_like_alone(model, processor, three_rows(), method)


@pytest.mark.parametrize("method", ["ivc_prune", "fastv", "pdrop", "vscan"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "internvl"])
def test_eager_attention_batches_too(family, method):
    model, processor = get_model(family, "eager")
    check_rows_like_alone(model, processor, three_rows(), method)


@pytest.mark.parametrize("method", ["ivc_prune", "fastv", "pdrop", "vscan", "adaptprune", "window_fastv"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_rows_with_several_images_and_a_video(family, method):
    model, processor = get_model(family)
    rows = [dict(prompt="Compare the two pictures.", images=[make_image(seed=4), make_image(112, 140, seed=5)]),
            dict(prompt="What happens in the clip?", video_frames=4),
            dict(prompt="Say hi.")]
    session = check_rows_like_alone(model, processor, rows, method)
    assert [len(r.segments) for r in session.last] == [2, 2, 0]  # two images; two temporal slices; none


@pytest.mark.parametrize("family", FAMILIES)
def test_the_authors_settings_batch_too(family):
    model, processor = get_model(family)
    params = authors_params(ivcp.adapters.adapter_for(model).family, "ivc_prune")
    check_rows_like_alone(model, processor, three_rows(), "ivc_prune", params)


@pytest.mark.parametrize("method,params", [("ivc_prune", {}), ("pdrop", {"position_policy": "renumber"}),
                                           ("ivc_union", {"base": "pdrop"})])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_sampling_and_renumbered_positions_match_the_oracle(family, method, params):
    model, processor = get_model(family)
    check_rows_like_alone(model, processor, three_rows(), method, params, sample=method == "ivc_prune")
    if method != "ivc_prune":
        check_rows_like_alone(model, processor, three_rows(), method, params)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "internvl"])
def test_the_processors_own_batch_is_the_same_batch(family):
    """The helper builds exactly what the family's processor makes of a left-padded batch."""
    model, processor = get_model(family)
    rows = three_rows()
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"} for _ in row.get("images", [])]
                                             + [{"type": "text", "text": row["prompt"]}]}], add_generation_prompt=True)
             for row in rows]
    images = [image for row in rows for image in row.get("images", [])]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        theirs = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    finally:
        processor.tokenizer.padding_side = side
    ours = make_batch_inputs(processor, rows)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_batch_record(family="qwen2_5_vl"):
    model, processor = get_model(family)
    batch = make_batch_inputs(processor, three_rows())
    with torch.no_grad(), ivcp.prune(model, "fastv", keep_ratio=0.5, selection_layer=2) as session:
        cache = output_cache(model(**batch, use_cache=True))
    last = session.last
    assert last.batch_size == 3 and [r.padding for r in last] == [int((m == 0).sum()) for m in batch["attention_mask"]]
    with pytest.raises(AttributeError, match=r"session.last\[b\].kept"):
        last.kept
    # the cache holds the longest row; each row counts its own entries
    width = batch["input_ids"].shape[1]
    assert last.cache_lengths == [layer.keys.shape[-2] for layer in cache.layers]
    assert last.cache_lengths[:2] == [width, width]
    assert last.cache_lengths[2] == max(r.kv_lengths[2] for r in last)
    for r in last:
        real = width - r.padding
        assert r.kv_lengths[:2] == [real, real]
        assert r.kv_lengths[2] == r.kept.numel() == real - (r.n_visual - r.n_visual_kept)
    # the batch's share: every row's visual entries over all layers
    total = sum(r.n_visual * 4 for r in last)
    assert last.visual_kv_share == pytest.approx(sum(sum(r.visual_kv_per_layer) for r in last) / total)
    assert last[1].n_visual == 0 and last[1].visual_kv_share == 1.0


def test_a_batch_of_one_reads_like_a_row():
    model, processor = get_model("qwen2_5_vl")
    inputs = make_inputs(processor, "Where?", images=[make_image()])
    with torch.no_grad(), ivcp.prune(model, "ivc_prune") as session:
        model(**inputs)
    assert len(session.last) == 1
    assert session.last.kept is session.last[0].kept
    assert session.last.kv_lengths == session.last.cache_lengths


def test_a_decode_mask_that_does_not_cover_the_sequence_is_refused():
    model, processor = get_model("qwen2_5_vl")
    batch = make_batch_inputs(processor, three_rows())
    with torch.no_grad(), ivcp.prune(model, "ivc_prune") as session:
        out = model(**batch, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        short = torch.ones(3, session.last.cache_lengths[0] + 1, dtype=torch.long)  # the pruned length: wrong
        with pytest.raises(ValueError, match="unpruned sequence"):
            model(input_ids=step, **{CACHE_KWARG: output_cache(out)}, attention_mask=short,
                  use_cache=True)


def test_a_row_of_only_padding_is_refused():
    model, processor = get_model("qwen2_5_vl")
    batch = make_batch_inputs(processor, three_rows())
    batch["attention_mask"][1] = 0
    with torch.no_grad(), ivcp.prune(model, "ivc_prune"), pytest.raises(ValueError, match="all padding"):
        model(**batch)


def equal_length_rows(processor) -> list[dict]:
    """Two rows of one length whose images differ in size (so their kept sets differ in length): the
    model's own mask is plain causal (None under sdpa and flash-attention), the pruned layout is padded."""
    rows = [dict(prompt="Where is the largest shape?", images=[make_image(seed=4)]),
            dict(prompt="Which colour?", images=[make_image(160, 112, seed=7)])]
    lengths = [make_inputs(processor, **row)["input_ids"].shape[1] for row in rows]
    rows[1]["prompt"] += " " * (lengths[0] - lengths[1])  # the byte tokenizer: one token per byte
    assert make_inputs(processor, **rows[1])["input_ids"].shape[1] == lengths[0]
    return rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["ivc_prune", "fastv", "pdrop"])
def test_rows_of_one_length_with_different_budgets(method, attn):
    model, processor = get_model("qwen2_5_vl", attn)
    session = check_rows_like_alone(model, processor, equal_length_rows(processor), method)
    assert [r.padding for r in session.last] == [0, 0]
    assert len({r.kept.numel() for r in session.last}) == 2


def emulated_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash-attention's semantics on the CPU: a 2-D padding mask (or None), causal aligned to the last key,
    padding queries give zeros. (The oracle's own 4-D masks are applied as sdpa would.)"""
    if attention_mask is not None and attention_mask.dim() == 4:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    batch, heads, queries, dim = query.shape
    keys = key.shape[2]
    key = key.repeat_interleave(heads // key.shape[1], 1)
    value = value.repeat_interleave(heads // value.shape[1], 1)
    allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None].expand(batch, 1, -1, -1)
    real_queries = torch.ones(batch, queries, dtype=torch.bool)
    if attention_mask is not None:
        assert attention_mask.shape == (batch, keys), "flash-attention takes a (batch, keys) padding mask"
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        real_queries = attention_mask.bool()[:, -queries:]
    probs = ((query @ key.transpose(-1, -2)) * (scaling or dim ** -0.5)).masked_fill(~allowed, float("-inf"))
    out = probs.softmax(-1).nan_to_num(0.0) @ value * real_queries[:, None, :, None]
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def flash_attention_emulated():
    """The tiny Qwen2.5-VL's decoder on the emulated flash-attention (its 2-D masks and None), restored after."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, processor = get_model("qwen2_5_vl")
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = emulated_flash_attention
    model.config.text_config._attn_implementation = "flash_attention_2"
    try:
        yield model, processor
    finally:
        del ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
        model.config.text_config._attn_implementation = "sdpa"


@pytest.mark.parametrize("method", ["ivc_prune", "fastv", "pdrop", "vscan"])
def test_flash_attention_masks(flash_attention_emulated, method):
    model, processor = flash_attention_emulated
    check_rows_like_alone(model, processor, three_rows(), method)  # left padding: 2-D masks
    check_rows_like_alone(model, processor, equal_length_rows(processor), method)  # no padding: None, then 2-D


@pytest.mark.parametrize("method", ["ivc_prune", "fastv"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_a_hand_written_batched_loop_decodes_each_row_as_alone(family, method):
    """A decode loop that passes the growing attention mask but no position ids: the engine gives each row
    the positions it has alone (transformers would count them from the shorter cache). The loop feeds
    each row the tokens it generates alone."""
    model, processor = get_model(family)
    rows = three_rows()
    alone = []
    for row in rows:
        single = make_inputs(processor, **row)
        row_logits, sequences, _ = _generate(model, single, method, {})
        alone.append((row_logits[0], sequences[0, single["input_ids"].shape[1]:]))
    tokens = torch.stack([generated for _, generated in alone])  # (rows, STEPS)
    batch = make_batch_inputs(processor, rows)
    logits = []
    with torch.no_grad(), ivcp.prune(model, method):
        out = model(**batch, use_cache=True)
        cache, mask = output_cache(out), batch["attention_mask"]
        for step in range(STEPS):
            logits.append(out.logits[:, -1])
            mask = torch.cat([mask, torch.ones_like(tokens[:, :1])], dim=1)
            out = model(input_ids=tokens[:, step: step + 1], attention_mask=mask, use_cache=True,
                        **{CACHE_KWARG: cache})
    logits = torch.stack(logits, dim=1)
    for b, (row_logits, _) in enumerate(alone):
        torch.testing.assert_close(logits[b], row_logits, atol=1e-4, rtol=0)


def test_a_family_that_cannot_split_a_batchs_grids_says_so():
    """The base adapter takes all grids for one row; with more rows it names what the family's adapter lacks."""
    from ivcp.adapters.base import ModelAdapter

    model, _ = get_model("qwen2_5_vl")
    base = ModelAdapter(model)
    grids = torch.tensor([[1, 4, 4]])
    assert base.split_visual_inputs(torch.zeros(1, 5, dtype=torch.long), grids, None, None) == [(grids, None, None)]
    assert base.split_visual_inputs(torch.zeros(2, 5, dtype=torch.long), None, None, None) == [(None, None, None)] * 2
    with pytest.raises(NotImplementedError, match="split_visual_inputs"):
        base.split_visual_inputs(torch.zeros(2, 5, dtype=torch.long), grids, None, None)
