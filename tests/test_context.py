"""What a method sees: segments, text queries, value vectors and attention rows, checked against
the model's own eager attention and projections."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import ivcp
from ivcp.methods import PruningMethod
from ivcp.methods.registry import _METHODS
from ivcp.testing import make_image, make_inputs

from conftest import get_model


@dataclass
class Probe(PruningMethod):
    """Keeps everything and stores what the context gives it (a method written the documented way)."""

    name: ClassVar[str] = "probe_for_tests"
    selection_layer: int | None = 2
    seen: dict | None = None

    def select(self, ctx):
        seg = ctx.segments[0]
        self.seen.update(
            segments=list(ctx.segments),
            text=ctx.text_queries(seg),
            values=ctx.values(seg.indices()),
            attention=ctx.attention([ctx.last_token], ctx.visual_tokens(), layer=self.selection_layer - 1),
            attention_k=ctx.attention([ctx.last_token], ctx.visual_tokens(), layer=self.selection_layer),
            keys=ctx.keys(seg.indices()),
            last_row=ctx.last_token_attention(self.selection_layer - 1),
        )
        return ctx.visual_tokens()


@pytest.fixture
def probe():
    ivcp.register_method(Probe)
    yield Probe
    _METHODS.pop(Probe.name, None)


def _run_probe(model, inputs, **kwargs):
    seen = {}
    with torch.no_grad(), ivcp.prune(model, Probe(seen=seen)) as session:
        out = model(**inputs, **kwargs)
    return seen, out, session


def test_attention_row_equals_eager_attention(family, probe):
    model, processor = get_model(family, "eager")
    inputs = make_inputs(processor, "Which shape is largest?", images=[make_image(seed=4)])
    seen, out, _ = _run_probe(model, inputs, output_attentions=True)
    start, end = seen["segments"][0].start, seen["segments"][0].end
    for layer, key in ((1, "attention"), (2, "attention_k")):
        expected = out.attentions[layer][:, :, -1:, start:end]  # (B, H, 1, N), last prompt token's row
        torch.testing.assert_close(seen[key], expected.float(), atol=1e-5, rtol=1e-4)
    visual, row = seen["last_row"]
    assert visual.tolist() == list(range(start, end))
    torch.testing.assert_close(row, out.attentions[1][0, :, -1, start:end].float().mean(0), atol=1e-5, rtol=1e-4)


def test_values_from_cache_equal_recomputed_projection(family, probe):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Count the shapes.", images=[make_image()])
    cached, _, _ = _run_probe(model, inputs, use_cache=True)
    recomputed, _, _ = _run_probe(model, inputs, use_cache=False)
    torch.testing.assert_close(cached["values"], recomputed["values"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached["keys"], recomputed["keys"], atol=1e-5, rtol=1e-5)
    # and they are layer 1's v_proj of its normed input, captured independently with a hook
    layer = model.model.language_model.layers[1]
    grabbed = {}
    handle = layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: grabbed.setdefault("v", o))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    seg = cached["segments"][0]
    v = grabbed["v"][:, seg.start: seg.end].view(1, seg.n, -1, 16).transpose(1, 2)
    torch.testing.assert_close(cached["values"], v, atol=1e-5, rtol=1e-5)


def test_text_queries_follow_the_image(family, probe):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Find it.", images=[make_image()])
    seen, _, _ = _run_probe(model, inputs)
    seg = seen["segments"][0]
    ids = inputs["input_ids"][0]
    expected = [i for i in range(seg.end, ids.numel()) if int(ids[i]) not in (259, 260, 262, 263)]
    assert seen["text"].tolist() == expected
    assert processor.decode(ids[seen["text"]], skip_special_tokens=False).startswith("Find it.<|im_end|>")


def test_text_queries_fall_back_to_the_same_turn_before_the_image(family, probe):
    model, processor = get_model(family)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}], add_generation_prompt=False)
    text = text[: text.rindex("<|vision_end|>") + len("<|vision_end|>")]  # the prompt ends with the image
    inputs = processor(text=text, images=[make_image()], return_tensors="pt")
    seen, _, _ = _run_probe(model, inputs)
    decoded = processor.decode(inputs["input_ids"][0][seen["text"]], skip_special_tokens=False)
    assert decoded == "\n<|im_start|>user\nLook:"  # everything after the system turn closed


def test_segments_from_grids_equal_segments_from_positions(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Compare.", images=[make_image(224, 168), make_image(112, 140, seed=1)],
                         video_frames=4)
    adapter = ivcp.adapters.adapter_for(model)
    position_ids, _ = model.model.get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"], **({"mm_token_type_ids": inputs["mm_token_type_ids"]}
                                                     if "mm_token_type_ids" in model.model.get_rope_index.__code__.co_varnames else {}))
    from_grids = adapter.segments(inputs["input_ids"][0], inputs["image_grid_thw"], inputs["video_grid_thw"])
    from_positions = adapter.segments(inputs["input_ids"][0], None, None, position_ids[:, 0])
    assert from_grids == from_positions
    assert [(s.kind, s.grid_h, s.grid_w, s.frame) for s in from_grids] == [
        ("image", 6, 8, 0), ("image", 5, 4, 0), ("video", 3, 4, 0), ("video", 3, 4, 1)]
