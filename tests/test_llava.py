"""LLaVA-1.5: 1-D IVC scores and the authors' union budget by hand, image spans from the input ids,
the adapter's facts. (Exact decoding of every method: tests/test_families.py.)"""

import math

import pytest
import torch

import ivcp
from ivcp.adapters import RopeSpec, Segment, adapter_for
from ivcp.testing import make_image, make_inputs

from conftest import get_model


def test_ivc_tokens_of_a_real_prompt_by_hand():
    """The IVC set of a tiny LLaVA prompt from its absolute 1-D positions, computed with math.cos/sin."""
    model, processor = get_model("llava")
    inputs = make_inputs(processor, "Where is it?", images=[make_image()])
    with torch.no_grad(), ivcp.prune(model, "ivc_prune") as session:
        model(**inputs)
    (start, end), = session.last.segments
    theta, d = 10000.0, 16  # the tiny decoder: head_dim 64 / 4 heads
    freqs = [theta ** (-2 * k / d) for k in range(d // 2)]
    v = {m: sum(math.cos(m * f) for f in freqs) for m in range(start, end)}
    u = {m: sum(math.sin(m * f) for f in freqs) for m in range(start, end)}
    k = round(0.05 * (end - start))  # LLaVA's IVC ratio: 5 % by V and 5 % by U
    top = lambda scores: sorted(scores, key=lambda m: (-scores[m], m))[:k]  # noqa: E731
    assert session.last.marks["ivc"].tolist() == sorted(set(top(v)) | set(top(u)))


class HandContext:
    """Four image tokens at 2..5 of a 9-token prompt; value vectors chosen by hand."""

    rope = RopeSpec(theta=10000.0, head_dim=4)
    device = torch.device("cpu")
    alive = torch.arange(9)

    def __init__(self):
        a = 3.0
        values = torch.zeros(9, 2)
        values[2], values[3], values[4], values[5] = torch.tensor([a, 0]), torch.tensor([0, a]), \
            torch.tensor([-a, 0]), torch.tensor([0, -a])
        values[8] = torch.tensor([a, 0])  # the only text query (two tokens after the image end, 6)
        self._values = values
        self.marks = {}

    def positions(self, segment):
        return torch.arange(segment.start, segment.end)

    def text_queries(self, segment, offset=0):
        assert offset == 2
        return torch.tensor([8])

    def values(self, tokens, layer=None, norm=True):
        return self._values[torch.as_tensor(tokens)][None, None]  # (B=1, heads=1, T, d=2)

    def mark(self, name, tokens):
        self.marks[name] = tokens


def test_the_authors_union_budget_by_hand():
    # IVC, positions 2..5 with θ = (1, 0.01): V = cos m + cos 0.01m = 0.584, 0.010, 0.345, 1.282 -> top: 5;
    # U = sin m + sin 0.01m = 0.929, 0.171, -0.717, -0.909 -> top: 2. Value similarity of the query
    # (3, 0): logits 9/√2 for token 2, 0 for 3 and 5, -9/√2 for 4 -> seed 2, foreground (top 1) 2.
    ctx, segment = HandContext(), Segment(2, 6, 2, 2)
    union = ivcp.make_method("ivc_prune", ivc_ratio=0.25, foreground_ratio=0.2, budget_mode="reference_union",
                             foreground_softmax="sequence", text_query_offset=2)
    assert (2 + union.select_segment(ctx, segment)).tolist() == [2, 5]
    assert ctx.marks["ivc"].tolist() == [2, 5] and ctx.marks["seed"].tolist() == [2]
    # the same set filled to 3 tokens: the next by the refined score is 3 (logit 0, ahead of 4's -9/√2;
    # 3 before 5 on the tie, but 5 is kept already)
    fill = ivcp.make_method("ivc_prune", ivc_ratio=0.25, keep_ratio=0.75, foreground_softmax="sequence",
                            text_query_offset=2)
    assert (2 + fill.select_segment(HandContext(), segment)).tolist() == [2, 3, 5]


def test_sequence_softmax_normalises_over_every_token():
    from ivcp.scoring import foreground_scores

    ctx = HandContext()
    text, image, everything = ctx.values([8])[0], ctx.values(range(2, 6))[0], ctx.values(range(9))[0]
    s_visual, _, _ = foreground_scores(text, image, 0.01)
    s_sequence, _, _ = foreground_scores(text, image, 0.01, context_values=everything, image_columns=torch.arange(2, 6))
    logits = torch.tensor([9, 0, -9, 0]) / math.sqrt(2)
    # over the sequence the denominator also holds tokens 0, 1, 6, 7 (logit 0) and the query itself (9/√2)
    denominator = logits.exp().sum() + 4 + math.exp(9 / math.sqrt(2))
    assert torch.allclose(s_visual, logits.softmax(0), atol=1e-6)
    assert torch.allclose(s_sequence, logits.exp() / denominator, atol=1e-6)


def test_adjacent_images_are_split_into_grids():
    model, processor = get_model("llava")
    images = [make_image(seed=1), make_image(seed=2)]
    inputs = processor(text="USER: <image><image> Compare them. ASSISTANT:", images=images, return_tensors="pt")
    adapter = adapter_for(model)
    segments = adapter.segments(inputs["input_ids"][0], None, None)  # one run of 128 image tokens
    assert [(s.start, s.n, s.grid_h, s.grid_w, s.source) for s in segments] == [(6, 64, 8, 8, 0), (70, 64, 8, 8, 1)]
    with pytest.raises(ValueError, match="a run of 100 image tokens at 6 is not a whole number of 8 x 8 images"):
        adapter.segments(torch.cat([inputs["input_ids"][0][:106], inputs["input_ids"][0][134:]]), None, None)


def test_adapter_facts():
    model, _ = get_model("llava")
    adapter = adapter_for(model)
    assert adapter.family == "llava" and adapter.position_rows == 1
    assert adapter.rope == RopeSpec(10000.0, 16)
    assert adapter.vision_depth == 3 and adapter.vision_global_block == 1  # features: hidden_states[-2]
    assert adapter.marker_token_ids == {model.config.image_token_id}


def test_authors_fixed_image_span_is_what_the_authors_pruned(monkeypatch):
    """image_span "authors_fixed" (model.config.ivcp_image_span): the authors' LLaVA config puts the image at
    index 5 with side² tokens whatever the prompt; transcribed here on the tiny model (8 x 8 = 64 tokens): the
    span 5..68 holds system-prompt text then the image's first tokens; IVC scores come from positions 5..68;
    the text queries run from 5 + 64 + 2 = 71 to the end, the image's later tokens included; every token
    outside the span stays. Decoding stays exact against the oracle."""
    from ivcp.config import authors_params
    from ivcp.engine import SelectionContext

    from oracle import oracle_logits, record_stages, trimmed_layers

    model, processor = get_model("llava")
    text = "A chat between a curious human and an AI. USER: <image>\nWhere is the largest shape? ASSISTANT:"
    inputs = processor(text=text, images=[make_image(seed=4)], return_tensors="pt")
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().flatten()
    first_image, n = int(image[0]), ids.numel()
    assert first_image > 5 + 8 and image.numel() == 64  # the real image starts well after index 5
    queries = []
    original = SelectionContext.text_queries
    monkeypatch.setattr(SelectionContext, "text_queries",
                        lambda self, seg, offset=0: queries.append(original(self, seg, offset)) or queries[-1])
    monkeypatch.setattr(model.config, "ivcp_image_span", "authors_fixed", raising=False)
    params = authors_params("llava", "ivc_prune")
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", **params) as session:
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    record = session.last
    assert record.segments == [(5, 69)]
    # the IVC set: positions 5..68, top round(0.05 * 64) = 3 by V and by U (head_dim 16, θ 10000)
    freqs = [10000.0 ** (-2 * k / 16) for k in range(8)]
    v = {m: sum(math.cos(m * f) for f in freqs) for m in range(5, 69)}
    u = {m: sum(math.sin(m * f) for f in freqs) for m in range(5, 69)}
    top = lambda scores: sorted(scores, key=lambda m: (-scores[m], m))[:3]  # noqa: E731
    assert record.marks["ivc"].tolist() == sorted(set(top(v)) | set(top(u)))
    # queries: every token from 71 on, the image's tokens 71..first_image+63 among them
    assert queries[0].tolist() == list(range(71, n))
    kept = set(record.kept.tolist())
    assert set(range(5)) | set(range(69, n)) <= kept  # outside the span nothing is dropped
    assert set(range(5, first_image)) - kept  # system-prompt text inside the span can be dropped
    generated = out.sequences[0, n:]
    expected = oracle_logits(model, dict(inputs), generated, record_stages(record), trimmed_layers(session))
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], expected, atol=1e-4, rtol=0)
    monkeypatch.setattr(model.config, "ivcp_image_span", "sometimes", raising=False)
    with pytest.raises(ValueError, match="ivcp_image_span must be one of 'auto', 'authors_fixed', got 'sometimes'"):
        adapter_for(model).segments(ids, None, None)


def test_cls_attention_is_clips_own_cls_row():
    """VScan's LLaVA score (clip_encoder.py: attentions[:, :, 0, 1:], mean over heads) from the adapter equals the
    row CLIP's eager attention returns, for the local and the global block."""
    model, processor = get_model("llava", "eager")
    adapter = adapter_for(model)
    inputs = make_inputs(processor, "Where?", images=[make_image(seed=2)])
    captured = {}

    class Capture(ivcp.methods.vscan.VScan):
        def _encoder_stage(self, ctx):
            for block in self._blocks(ctx):  # the local and the global block (the blocks the engine reads)
                captured[block] = ctx.vision_attention(ctx.segments[0], block, "cls")
            return super()._encoder_stage(ctx)

    with torch.no_grad(), ivcp.prune(model, Capture(selection_layer=2, encoder_signal="cls", window=6,
                                                    window_rule="fixed")):
        model(**inputs)
    tower = adapter.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True)
    assert sorted(captured) == [0, 1]  # the tiny tower: 3 blocks, local 0, global (feature layer -2) 1
    for block, row in captured.items():
        expected = out.attentions[block][0, :, 0, 1:].mean(0)
        torch.testing.assert_close(row.cpu(), expected, atol=1e-6, rtol=0)
