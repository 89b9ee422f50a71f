"""Qwen3-VL (dense and MoE): deepstack at every selection layer, interleaved M-RoPE IVC scores by
hand, q/k norms in the recomputed attention, 0–1000 boxes. (Every method with the family's defaults:
tests/test_families.py.)"""

import math

import pytest
import torch

import ivcp
from ivcp.adapters import RopeSpec, adapter_for
from ivcp.eval.grounding import parse_box, paper_iou, paper_prediction
from ivcp.scoring import ivc_scores
from ivcp.testing import make_image, make_inputs

from conftest import get_model
from oracle import oracle_logits, record_stages, trimmed_layers


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("layer", [1, 2, 3, 4])  # deepstack feeds the inputs of layers 1, 2, 3; 4 is beyond
@pytest.mark.parametrize("method", ["ivc_prune", "fastv"])
def test_pruning_at_and_beyond_the_deepstack_layers_matches_the_oracle(family, layer, method):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Where is the green shape?", images=[make_image(seed=3)])
    with torch.no_grad(), ivcp.prune(model, method, selection_layer=layer, keep_ratio=0.4) as session:
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    generated = out.sequences[0, inputs["input_ids"].shape[1]:]
    expected = oracle_logits(model, inputs, generated, record_stages(session.last), trimmed_layers(session))
    torch.testing.assert_close(torch.stack(out.logits, dim=1)[0], expected, atol=1e-4, rtol=0)
    assert session.last.n_visual_kept == round(0.4 * session.last.n_visual)


def test_deepstack_features_reach_only_present_tokens():
    """Without pruning, taking deepstack out of the decoder and adding it in the layer hooks is exact."""
    model, processor = get_model("qwen3_vl")
    inputs = make_inputs(processor, "Describe.", images=[make_image()])
    with torch.no_grad():
        bare = model(**inputs).logits
        with ivcp.prune(model, "ivc_prune", keep_ratio=1.0, selection_layer=1):
            same = model(**inputs).logits
    assert torch.equal(bare, same)


def test_interleaved_ivc_scores_by_hand():
    # head_dim 12: 6 frequencies, sections (t, h, w) = (2, 2, 2): interleaved k = 0 t, 1 h, 2 w, 3 t, 4 h, 5 w
    rope = RopeSpec(theta=100.0, head_dim=12, mrope_section=(2, 2, 2), interleaved=True)
    assert rope.frequency_streams().tolist() == [0, 1, 2, 0, 1, 2]
    # Qwen3-VL's own released sections: 0..59 cycle t, h, w; 60..63 are t
    released = RopeSpec(5e6, 128, (24, 20, 20), interleaved=True).frequency_streams().tolist()
    assert released[:6] == [0, 1, 2, 0, 1, 2] and released[57:] == [0, 1, 2, 0, 0, 0, 0] and released.count(0) == 24
    positions = torch.tensor([[5, 5, 5], [5, 5, 6], [5, 6, 7]])  # t, h, w rows of 3 tokens
    theta = [100.0 ** (-2 * k / 12) for k in range(6)]
    stream = [0, 1, 2, 0, 1, 2]
    v, u = ivc_scores(positions, rope, "sectioned")
    for token in range(3):
        expected_v = sum(math.cos(positions[stream[k], token].item() * theta[k]) for k in range(6))
        expected_u = sum(math.sin(positions[stream[k], token].item() * theta[k]) for k in range(6))
        assert v[token].item() == pytest.approx(expected_v, abs=1e-12)
        assert u[token].item() == pytest.approx(expected_u, abs=1e-12)
    contiguous = RopeSpec(theta=100.0, head_dim=12, mrope_section=(2, 2, 2))
    assert contiguous.frequency_streams().tolist() == [0, 0, 1, 1, 2, 2]
    assert not torch.allclose(ivc_scores(positions, contiguous, "sectioned")[0], v)


def test_recomputed_attention_applies_the_q_and_k_norms():
    model, processor = get_model("qwen3_vl")
    adapter = adapter_for(model)
    attention = adapter.attention(adapter.layers[1])
    hidden = torch.randn(1, 3, 64)
    keys = adapter.project_heads(attention, "k", hidden)
    by_hand = attention.k_norm(attention.k_proj(hidden).view(1, 3, -1, 16)).transpose(1, 2)
    assert torch.equal(keys, by_hand)
    assert not torch.allclose(keys, attention.k_proj(hidden).view(1, 3, -1, 16).transpose(1, 2))


def test_boxes_in_0_to_1000_by_hand():
    # Qwen3-VL writes {"bbox_2d": [...]} relative to 1000: on a 640 x 480 picture [100, 250, 500, 750]
    # is (64, 120, 320, 360)
    answer = '```json\n[{"bbox_2d": [100, 250, 500, 750], "label": "cat"}]\n```'
    assert parse_box(answer, "norm1000", (640, 480)).box == pytest.approx((64.0, 120.0, 320.0, 360.0))
    assert paper_prediction(answer, "qwen3_vl") == (0.1, 0.25, 0.5, 0.75)
    # the strict metric scales normalised boxes by the picture: IoU with the same box in pixels is 1
    assert paper_iou(paper_prediction(answer, "qwen3_vl"), (64, 120, 320, 360), 640, 480) == pytest.approx(1.0)
