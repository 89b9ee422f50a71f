"""Baselines and ablations: selection rules on hand-built inputs, then every method end to end
against the masked no-cache oracle on both tiny families."""

import math

import pytest
import torch

import ivcp
from ivcp.adapters import Segment
from ivcp.methods.adaptprune import adaptive_nms, centre_prior
from ivcp.methods.fastv import FastV
from ivcp.methods.vscan import fixed_window_top, merge_into_kept, windowed_top
from ivcp.methods.window_fastv import window_layout, window_quota_selection, window_side
from ivcp.scoring import ivc_scores, ivc_token_set
from ivcp.testing import make_image, make_inputs

from conftest import get_model
from oracle import oracle_logits, record_stages, trimmed_layers, vscan_embedding_updates


# --- selection rules by hand ---------------------------------------------------------------------

class RowContext:
    """A context whose last-token attention row is given."""

    def __init__(self, row, start=10):
        self.row = torch.tensor(row)
        self.layer, self.stage, self.device, self.last_token = 2, 0, torch.device("cpu"), 99
        self.visual = torch.arange(start, start + len(row))
        self.segments = [Segment(start, start + len(row), 1, len(row))]

    def visual_tokens(self, segment=None):
        return self.visual

    def last_token_attention(self, layer=None, rotary=True):
        assert layer == self.layer - 1 and rotary
        return self.visual, self.row


def test_fastv_keeps_the_top_of_a_known_row():
    ctx = RowContext([0.05, 0.30, 0.10, 0.25, 0.05, 0.25])
    # keep round(0.5 * 6) = 3: 0.30 (11), then the tie 0.25 at 13 and 15
    assert sorted(FastV(keep_ratio=0.5).select(ctx).tolist()) == [11, 13, 15]
    assert FastV(keep_ratio=0.5).rank(ctx).tolist()[:4] == [11, 13, 15, 12]


def test_top_covering_gives_every_image_a_token():
    from ivcp.scoring import top_covering

    segments = [Segment(0, 4, 2, 2), Segment(10, 11, 1, 1), Segment(20, 24, 2, 2)]
    ranked = torch.tensor([0, 1, 2, 20, 3, 21, 22, 10, 23])  # the 1-token image (10) ranks late
    # top 4 = 0, 1, 2, 20; image 10 is missing: its token replaces the lowest-ranked choice of an
    # image that keeps several (2, of the first image, since 20 is the third image's only one)
    assert top_covering(ranked, 4, segments).tolist() == [0, 1, 20, 10]
    assert top_covering(ranked, 9, segments).tolist() == ranked.tolist()  # nothing missing
    # more images than budget: each keeps one
    assert sorted(top_covering(ranked, 1, segments).tolist()) == [0, 10, 20]


def test_window_side_searches_divisors_in_range_only():
    # the IVC-Prune helper (_find_best_divisor): divisors within [3, 6] closest to 4, else 4 itself
    assert window_side(24, 4, 3, 6) == 4
    assert window_side(18, 4, 3, 6) == 3  # 3 and 6 divide 18: 3 is closer to 4
    assert window_side(20, 4, 3, 6) == 4
    assert window_side(25, 4, 3, 6) == 5
    assert window_side(30, 4, 3, 6) == 3  # 3 and 5 equally close: the smaller
    for prime in (13, 17, 19, 23):  # never 1: no divisor in range -> the target, with boundary windows
        assert window_side(prime, 4, 3, 6) == 4
    assert window_side(2, 4, 3, 6) == 4  # a side shorter than a window: one boundary window covers it


def test_window_layout_on_17x23_by_hand():
    # RefCOCO's 640 x 480 on Qwen2.5-VL: 17 x 23 merged tokens, both prime -> 4 x 4 windows:
    # 4 window rows (0-16) x 5 window columns (0-20), a 3-wide right strip, a 1-high bottom strip, the corner
    windows = window_layout(17, 23)
    full = [(r, r + 4, c, c + 4) for r in (0, 4, 8, 12) for c in (0, 4, 8, 12, 16)]
    right = [(r, r + 4, 20, 23) for r in (0, 4, 8, 12)]
    bottom = [(16, 17, c, c + 4) for c in (0, 4, 8, 12, 16)]
    assert windows == full + right + bottom + [(16, 17, 20, 23)]
    covered = torch.zeros(17, 23, dtype=torch.long)
    for r0, r1, c0, c1 in windows:
        covered[r0:r1, c0:c1] += 1
    assert bool((covered == 1).all())


@pytest.mark.parametrize("grid,keep_ratio,quotas,total", [
    # 17 x 23 at 50 %: 20 full windows of 16 keep 8, 4 right strips of 12 keep 6, 5 bottom strips of 4 keep 2,
    # the 1 x 3 corner keeps round(1.5) = 2: 160 + 24 + 10 + 2 = 196 = round(0.5 * 391), nothing trimmed
    ((17, 23), 0.5, [8] * 20 + [6] * 4 + [2] * 5 + [2], 196),
    # 17 x 23 at 25 %: 4, 3, 1 and max(1, round(0.75)) = 1: 80 + 12 + 5 + 1 = 98 = round(97.75)
    ((17, 23), 0.25, [4] * 20 + [3] * 4 + [1] * 5 + [1], 98),
    # 13 x 19 (3 x 4 full windows, a 3-wide right strip, a 1-high bottom strip): 96 + 18 + 8 + 2 = 124
    ((13, 19), 0.5, [8] * 12 + [6] * 3 + [2] * 4 + [2], 124),
])
def test_window_fastv_quotas_by_hand(grid, keep_ratio, quotas, total):
    h, w = grid
    scores = torch.randperm(h * w, generator=torch.Generator().manual_seed(h * w)).double()
    kept = set(window_quota_selection(scores, h, w, keep_ratio).tolist())
    assert len(kept) == total
    index = torch.arange(h * w).view(h, w)
    for (r0, r1, c0, c1), quota in zip(window_layout(h, w), quotas, strict=True):
        members = index[r0:r1, c0:c1].flatten()
        best = members[torch.argsort(scores[members], descending=True)[:quota]]
        assert kept & set(members.tolist()) == set(best.tolist())


@pytest.mark.parametrize("grid", [(17, 23), (13, 19)])
def test_window_fastv_differs_from_fastv_on_prime_grids(grid):
    # FastV's pull toward the bottom (score grows with the row): FastV keeps the bottom half, the windows do not
    h, w = grid
    scores = torch.tensor([10.0 * r + c for r in range(h) for c in range(w)], dtype=torch.float64)
    kept = window_quota_selection(scores, h, w, 0.5)
    fastv = torch.sort(torch.topk(scores, kept.numel()).indices).values
    assert kept.numel() == round(0.5 * h * w)
    assert not torch.equal(kept, fastv)
    # the first window row (rows 0-3) keeps its quotas (8 per full window, 6 in the right strip); FastV keeps none there
    assert int((kept // w < 4).sum()) == 8 * (w // 4) + 6
    assert int((fastv // w < 4).sum()) == 0


def test_window_quotas_spread_the_budget():
    # 4 x 6 grid; FastV's scores favour the bottom rows (row r gets 10 * r + column)
    scores = torch.tensor([10.0 * r + c for r in range(4) for c in range(6)])
    kept = window_quota_selection(scores, 4, 6, keep_ratio=0.5, window_size=2, min_window_size=2)
    # 2 x 2 windows, quota round(0.5 * 4) = 2 each: the bottom row of each window, its two cells
    expected = [r * 6 + c for r in (1, 3) for c in range(6)]
    assert kept.tolist() == expected
    assert len(kept) == 12


def test_window_quotas_trim_to_the_budget():
    # 2 x 6 grid, 2 x 2 windows: quota max(1, round(0.2 * 4)) = 1 each -> 3 = budget round(0.2 * 12) = 2 + 1 -> trim
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7,
                           0.6, 0.5, 0.4, 0.0, 0.35, 0.05])
    # window picks: 1 (0.9), 3 (0.8), 5 (0.7); budget 2 -> the lowest (5) goes
    assert window_quota_selection(scores, 2, 6, 0.2, 2, 2, 2).tolist() == [1, 3]


def test_centre_prior_values():
    # the source's 24 x 24 prior: coordinates linspace(-12, 12, 24) = -12 + 24 i / 23, sigma 12, divided by the
    # maximum, which sits at the four central cells (+-12/23): exp(-2 (12/23)^2 / 288) = exp(-1/529)
    prior = centre_prior(24, 24).view(24, 24)
    assert prior[11, 11].item() == pytest.approx(1.0, abs=1e-12)
    assert prior[12, 11].item() == pytest.approx(1.0, abs=1e-12)
    # corner (-12, -12): exp(-288/288) / exp(-1/529)
    assert prior[0, 0].item() == pytest.approx(math.exp(-1 + 1 / 529), abs=1e-12)
    # edge middle (-12, -12/23): exp(-(144 + 144/529)/288 + 1/529) = exp(-1/2 + 1/1058)
    assert prior[0, 11].item() == pytest.approx(math.exp(-0.5 + 1 / 1058), abs=1e-12)
    # a 3 x 3 grid, same rule: coordinates -1.5, 0, 1.5, sigma 1.5 -> corner exp(-1/2 - 1/2)
    assert centre_prior(3, 3).view(3, 3)[0, 0].item() == pytest.approx(math.exp(-1), abs=1e-12)


class NMSContext(RowContext):
    """A 24 x 24 image whose attention row and layer-K keys are given."""

    def __init__(self, row, keys):
        super().__init__(row)
        self.segments = [Segment(10, 10 + 576, 24, 24)]
        self._keys = keys

    def keys(self, tokens, layer=None, norm=True, rotary=True):
        assert layer == self.layer and not norm and not rotary
        return self._keys[None]


def test_adaptprune_keeps_int_of_the_ratio():
    # the source keeps int(576 * 0.1) = 57 (rounding would give 58)
    gen = torch.Generator().manual_seed(0)
    ctx = NMSContext(torch.rand(576, generator=gen).tolist(), torch.randn(2, 576, 4, generator=gen))
    kept = ivcp.make_method("adaptprune", keep_ratio=0.1).select(ctx)
    assert kept.numel() == 57 and kept.unique().numel() == 57


def test_adaptive_nms_3x3_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1, 0.3])
    keys = torch.eye(9, dtype=torch.float64)
    keys[1] = keys[0]  # tokens 0 and 1 are duplicates (cosine 1); all others orthogonal (cosine 0)
    picks = adaptive_nms(scores, keys, 3, 3, keep=4)
    # pick 0 (0.9); token 1 (distance 1, cosine 1) drops to 0.8 * (1 - exp(-1/4.5)) = 0.15941;
    # orthogonal tokens keep their scores (factor 1 - exp(-200)); then 4 (0.5), 8 (0.3), 1 (0.159)
    assert picks.tolist() == [0, 4, 8, 1]
    assert 0.8 * (1 - math.exp(-1 / 4.5)) == pytest.approx(0.159410, abs=1e-6)
    # without the duplicate, plain top-k order
    assert adaptive_nms(scores, torch.eye(9, dtype=torch.float64), 3, 3, keep=3).tolist() == [0, 1, 4]
    # outside the radius nothing is suppressed: a far duplicate keeps its score
    far = torch.eye(9, dtype=torch.float64)
    far[8] = far[0]
    assert adaptive_nms(torch.tensor([0.9, 0, 0, 0, 0, 0, 0, 0, 0.8]), far, 3, 3, 2, radius=1.0).tolist() == [0, 8]


def test_vscan_windowed_top_caps_each_window():
    # 4 x 4 grid, 2 x 2 windows; the best scores all sit in the top-left window
    scores = torch.tensor([9.0, 8, 1, 1, 7, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    # k = 2 -> cap ceil(2/16) = 1 per window: 0 (top-left), then the best outside it: 15 (2.0)
    assert windowed_top(scores, 4, 4, 2, window=2).tolist() == [0, 15]
    # k = 20 > 16 tokens is clipped by the fill: every token once
    assert sorted(windowed_top(scores, 4, 4, 16, window=2).tolist()) == list(range(16))


def test_vscan_qwen_windows_on_17x23_by_hand():
    # VScan's window_selection: floor(17/4) x floor(23/4) = 4 x 5 windows; row 16 joins window row 3 (rows 12-16),
    # columns 20-22 join window column 4 (columns 16-22); k = 65 -> cap ceil(65/20) = 4 per window
    h, w = 17, 23
    scores = torch.zeros(h * w, dtype=torch.float64)
    at = lambda r, c: r * w + c  # noqa: E731
    # the five best tokens all in the bottom-right window (leftover row and columns included); the sixth next to it
    for value, (r, c) in zip((100, 99, 98, 97, 96, 95), ((16, 22), (16, 21), (12, 16), (14, 20), (16, 20), (11, 16))):
        scores[at(r, c)] = value
    kept = windowed_top(scores, h, w, 65, window=4).tolist()
    assert kept[:5] == [at(16, 22), at(16, 21), at(12, 16), at(14, 20), at(11, 16)]  # (16, 20) is the 5th: capped
    assert at(16, 20) not in kept and len(kept) == 65
    window_of = lambda j: (min(j // w // 4, 3), min(j % w // 4, 4))  # noqa: E731
    counts = {}
    for j in kept:
        counts[window_of(j)] = counts.get(window_of(j), 0) + 1
    # the zeros go in index order, each window up to its cap: 16 windows full (4), one more token, none over the cap
    assert counts[(3, 4)] == 4 and counts[(2, 4)] == 4
    assert sorted(counts.values()) == [1] + [4] * 16


def test_vscan_llava_windows_keep_floor_per_window():
    # 24 x 24, 6 x 6 windows (16): k = 172 local tokens -> floor(172 / 16) = 10 per window, 160 in all
    scores = torch.randperm(576, generator=torch.Generator().manual_seed(5)).double()
    kept = fixed_window_top(scores, 24, 24, 172, window=6)
    assert kept.numel() == 160
    grid = torch.arange(576).view(24, 24)
    for i in range(4):
        for j in range(4):
            members = grid[6 * i: 6 * i + 6, 6 * j: 6 * j + 6].flatten()
            best = members[torch.argsort(scores[members], descending=True)[:10]]
            assert set(kept.tolist()) & set(members.tolist()) == set(best.tolist())


class EncoderContext:
    """One 24 x 24 LLaVA image whose vision attention maps (per block and signal) are given."""

    def __init__(self, maps, start=5):
        self.maps, self.stage, self.device = maps, 0, torch.device("cpu")
        self.segments = [Segment(start, start + 576, 24, 24)]
        self.vision_local_block, self.vision_global_block, self.vision_depth = 5, 22, 24
        self.updated = None

    def vision_attention(self, segment, block, signal="received"):
        return self.maps[block, signal]

    def hidden_states(self, tokens):
        return torch.eye(576)[None]  # orthogonal features: nothing is similar, merging picks the first kept

    def update_hidden(self, tokens, values):
        self.updated = tokens


def test_vscan_llava_encoder_stage_on_hand_made_maps():
    # CLS rows: the local block's favours the first row of every 6 x 6 window, the global block's the last image row
    local_cls = torch.zeros(24, 24)
    local_cls[0::6, :] = torch.arange(24, dtype=torch.float32) + 1  # rows 0, 6, 12, 18
    global_cls = torch.zeros(24, 24)
    global_cls[23, :] = 1.0
    global_cls[22, :] = 0.5
    received = torch.rand(576, generator=torch.Generator().manual_seed(1))  # what "received" would read: unused
    maps = {(5, "cls"): local_cls.flatten(), (22, "cls"): global_cls.flatten(),
            (5, "received"): received, (22, "received"): received}
    ctx = EncoderContext(maps)
    vscan = ivcp.make_method("vscan", encoder_keep_ratio=0.6, encoder_signal="cls", window=6, window_rule="fixed")
    kept = vscan.select(ctx) - 5
    # k = int(0.6 * 576) = 345; local 345 // 2 = 172 -> 10 per window = 160; global 345 - 172 = 173
    assert kept.numel() == 160 + 173
    rows = kept // 24
    local = kept[(rows % 6 == 0)]
    # each window's first row has 6 scored cells (the 6 columns): all 6, then 4 more by index among its zeros
    assert int((rows == 0).sum()) == 4 * 6
    # global: rows 23 and 22 (48 tokens) first, then zeros by index among the rest
    assert set((23 * 24 + torch.arange(24)).tolist()) <= set(kept.tolist())
    assert set((22 * 24 + torch.arange(24)).tolist()) <= set(kept.tolist())
    assert local.numel() >= 16 * 6


@pytest.mark.parametrize("family,rotary,layer_7b", [("qwen2_5_vl", False, 14), ("llava", True, 16)])
def test_vscan_llm_stage_reads_layer_k_like_eager_attention(family, rotary, layer_7b):
    """Stage 2 scores with the selection layer's own norm and q/k (VScan's custom.py / llama_x.py): without
    rotary for Qwen, with the present positions' rotary for LLaVA; the released 7B models prune at 14 / 16."""
    from dataclasses import fields

    from ivcp.config import method_defaults
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_layers, hidden = (28, 3584) if family == "qwen2_5_vl" else (32, 4096)
    assert method_defaults(family, "vscan", n_layers, hidden)["selection_layer"] == layer_7b
    model, processor = get_model(family, "eager")
    adapter = ivcp.adapters.adapter_for(model)
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=11)])
    captured = {}

    class Spy(ivcp.methods.vscan.VScan):
        def _llm_stage(self, ctx):
            captured["layer"], captured["alive"] = ctx.layer, ctx.alive.cpu()
            captured["visual"], captured["scores"] = ctx.last_token_attention(ctx.layer, rotary=self.llm_rotary)
            return super()._llm_stage(ctx)

    method = ivcp.engine.resolve_method(model, "vscan")
    assert method.llm_rotary is rotary
    spy = Spy(**{f.name: getattr(method, f.name) for f in fields(method)})
    k = spy.selection_layer
    def rope(module, args, kwargs):
        captured.setdefault("rope", kwargs["position_embeddings"])

    def output(module, args, out):
        captured.setdefault("input", out[0] if isinstance(out, tuple) else out)

    with torch.no_grad(), ivcp.prune(model, spy):
        before = adapter.layers[k - 1]  # hooked after the engine: it sees the present tokens
        handles = [before.register_forward_pre_hook(rope, with_kwargs=True), before.register_forward_hook(output)]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    assert captured["layer"] == k
    layer = adapter.layers[k]
    attn = adapter.attention(layer)
    with torch.no_grad():
        x = adapter.input_norm(layer)(captured["input"])
        q = adapter.project_heads(attn, "q", x)
        key = adapter.project_heads(attn, "k", x)
        if rotary:
            q, key = apply_rotary_pos_emb(q, key, *captured["rope"])
        key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)
        probs = (q[:, :, -1:] @ key.transpose(-1, -2) * adapter.attention_scale(layer)).softmax(-1)[0, :, 0].mean(0)
    columns = torch.searchsorted(captured["alive"], captured["visual"].cpu())
    torch.testing.assert_close(captured["scores"].cpu(), probs[columns], atol=1e-6, rtol=0)


def test_vscan_merge_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.2]])
    merged = merge_into_kept(features, torch.tensor([0, 1]))
    # 2 and 4 are closest to 0, 3 to 1
    assert torch.allclose(merged[0], torch.tensor([(1.0 + 0.9 + 1.0) / 3, (0.0 + 0.1 + 0.2) / 3], dtype=torch.float64))
    assert torch.allclose(merged[1], torch.tensor([0.05, 0.95], dtype=torch.float64))


# --- end to end on the tiny models ---------------------------------------------------------------

E2E = [
    ("fastv", dict(keep_ratio=0.4)),
    ("window_fastv", dict(keep_ratio=0.4, window_size=2, min_window_size=2)),
    ("pdrop", dict(stage_layers=(1, 2, 3), stage_ratios=(0.7, 0.5, 0.5))),
    ("pdrop", dict(stage_layers=(1, 3), stage_ratios=(0.6, 0.5), position_policy="renumber")),
    ("adaptprune", dict(keep_ratio=0.3)),
    ("vscan", dict(selection_layer=2, encoder_keep_ratio=0.6, llm_keep_ratio=0.5)),
    ("random", dict(keep_ratio=0.3, seed=3)),
    ("drop_ivc", dict(ivc_ratio=0.2)),
    ("ivc_union", dict(base="fastv", base_params={"keep_ratio": 0.3})),
    ("ivc_union", dict(base="pdrop", base_params={"stage_layers": (1, 3), "stage_ratios": (0.5, 0.5)}, budget="same")),
    ("ivc_prune", dict(foreground_signal="attention", foreground_stages=2)),
    ("ivc_prune", dict(pattern="diagonal", budget_mode="paper_union")),
]


@pytest.mark.parametrize("method,params", E2E, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))[:40])
def test_every_method_decodes_like_the_oracle(family, method, params):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=11)])
    with torch.no_grad(), ivcp.prune(model, method, **params) as session:
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    generated = out.sequences[0, inputs["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, dim=1)[0]
    record = session.last
    assert 0 < record.n_visual_kept < record.n_visual
    updates = vscan_embedding_updates(model, inputs, record) if method == "vscan" else None
    expected = oracle_logits(model, inputs, generated, record_stages(record), trimmed_layers(session),
                             embedding_updates=updates,
                             renumber=getattr(session.method, "position_policy", "keep") == "renumber")
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_kv_policies_and_stage_counts(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Describe.", images=[make_image()])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with ivcp.prune(model, "pdrop", stage_layers=(1, 2, 3), stage_ratios=(0.7, 0.5, 0.5)) as pdrop:
            model(**inputs, use_cache=True)
        # 48 -> round(33.6) = 34 -> round(17) = 17 -> round(8.5) = 8
        assert [s["n_visual_kept"] for s in pdrop.last.stages] == [34, 17, 8]
        assert pdrop.last.kv_lengths == [n, n - 14, n - 31, n - 40]
        for name, params in (("window_fastv", {}), ("adaptprune", {})):
            with ivcp.prune(model, name, **params) as session:
                model(**inputs, use_cache=True)
            kept = session.last.kept.numel()
            assert session.last.kv_lengths == [n, n, kept, kept], name
        with ivcp.prune(model, "vscan", selection_layer=2, encoder_keep_ratio=0.5, llm_keep_ratio=0.5) as vscan:
            model(**inputs, use_cache=True)
        # the encoder stage removes tokens from every layer: 24 reach the LLM, 12 stay after layer 2
        assert [s["n_visual_kept"] for s in vscan.last.stages] == [24, 12]
        assert vscan.last.kv_lengths == [n - 24, n - 24, n - 36, n - 36]


def test_vscan_received_attention_is_a_distribution(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Compare.", images=[make_image(224, 168), make_image(112, 112, seed=3)],
                         video_frames=2)
    captured = {}

    class Capture(ivcp.methods.vscan.VScan):
        def _encoder_stage(self, ctx):
            for block in (ctx.vision_local_block, ctx.vision_depth - 1):  # both attend over whole frames
                captured.update({(seg, block): ctx.vision_attention(seg, block) for seg in ctx.segments})
            return super()._encoder_stage(ctx)

    with torch.no_grad(), ivcp.prune(model, Capture(selection_layer=2)):
        model(**inputs)
    blocks = {block for _, block in captured}
    assert len(captured) == 3 * len(blocks)  # two images and one temporal slice of the video
    for (seg, _), scores in captured.items():
        assert scores.numel() == seg.n
        # each query's softmax sums to 1 -> the mean over queries sums to 1 over the frame's patches;
        # pooling 4 patches per merged token by their mean leaves 1/4
        assert scores.sum().item() == pytest.approx(0.25, abs=1e-5)


def test_ivc_union_contains_the_ivc_set(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Where?", images=[make_image()])
    with torch.no_grad():
        with ivcp.prune(model, "ivc_union", base="fastv", base_params={"keep_ratio": 0.2}, ivc_ratio=0.2) as union:
            model(**inputs)
        with ivcp.prune(model, "fastv", keep_ratio=0.2) as plain:
            model(**inputs)
        with ivcp.prune(model, "ivc_union", base="fastv", base_params={"keep_ratio": 0.2}, ivc_ratio=0.05,
                        budget="same") as same:
            model(**inputs)
    (start, end), = union.last.segments
    positions = model.model.get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        **({"mm_token_type_ids": inputs["mm_token_type_ids"]}
           if "mm_token_type_ids" in model.model.get_rope_index.__code__.co_varnames else {}))[0][:, 0, start:end]
    adapter = ivcp.adapters.adapter_for(model)
    ivc = start + ivc_token_set(*ivc_scores(positions, adapter.rope), 0.2)
    assert torch.equal(union.last.marks["ivc"], ivc)
    assert torch.isin(ivc, union.last.kept).all()
    assert torch.isin(plain.last.kept, union.last.kept).all()  # the base choice is all there
    plain_visual = {t for t in plain.last.kept.tolist() if start <= t < end}
    assert union.last.n_visual_kept == len(plain_visual | set(ivc.tolist()))  # "extra": the union
    assert torch.isin(same.last.marks["ivc"], same.last.kept).all()
    assert same.last.n_visual_kept == plain.last.n_visual_kept == 10  # "same": the base's budget


def test_random_is_reproducible_by_seed(family):
    model, processor = get_model(family)
    inputs = make_inputs(processor, "Where?", images=[make_image()])
    kept = []
    for seed in (1, 1, 2):
        with torch.no_grad(), ivcp.prune(model, "random", seed=seed, keep_ratio=0.25) as session:
            model(**inputs)
        kept.append(session.last.kept)
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])
    assert session.last.n_visual_kept == 12


def test_ivc_union_refuses_a_method_that_does_not_rank():
    with pytest.raises(ValueError, match="does not rank tokens"):
        ivcp.make_method("ivc_union", base="adaptprune")


def test_all_issue_names_are_registered():
    assert {"ivc_prune", "fastv", "window_fastv", "pdrop", "vscan", "adaptprune", "random", "drop_ivc",
            "ivc_union"} <= set(ivcp.available_methods())


# --- PDrop's renumbered positions, decoding included ------------------------------------------------

def test_pdrop_renumber_decodes_at_pdrops_shifted_positions():
    """PDrop's decode loop (modeling_llama_pdrop.py) moves position_ids down at each stage's layer by the
    tokens that stage dropped. LLaVA tiny: 109 prompt tokens (ids 0..108), 64 image tokens; stage at layer 1
    keeps round(0.6·64) = 38 (26 dropped), stage at layer 3 keeps round(0.5·38) = 19 (19 more). Decode step t
    (unpruned id 109 + t): layer 0 → 109 + t, layers 1-2 → 83 + t, layer 3 → 64 + t."""
    model, processor = get_model("llava")
    adapter = ivcp.adapters.adapter_for(model)
    inputs = make_inputs(processor, "Where is the largest shape?", images=[make_image(seed=11)])
    assert inputs["input_ids"].shape[1] == 109
    seen: dict[int, list] = {i: [] for i in range(4)}
    with torch.no_grad(), ivcp.prune(model, "pdrop", stage_layers=(1, 3), stage_ratios=(0.6, 0.5),
                                     position_policy="renumber") as session:
        # registered after the engine's hooks: they see what the layer gets
        handles = [layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen[i].append((a[0] if a else k["hidden_states"], k["position_embeddings"])),
            with_kwargs=True) for i, layer in enumerate(adapter.layers)]
        try:
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        finally:
            for h in handles:
                h.remove()
    assert [s["n_visual_kept"] for s in session.last.stages] == [38, 19]
    expected_first = {0: 109, 1: 83, 2: 83, 3: 64}
    for layer, calls in seen.items():
        assert len(calls) == 3  # the prefill, then two decode steps
        for step, (hidden, (cos, sin)) in enumerate(calls[1:]):
            ids = torch.tensor([[[expected_first[layer] + step]]])
            want_cos, want_sin = adapter.rotary_embedding(hidden, ids)
            torch.testing.assert_close(cos, want_cos, atol=0, rtol=0)
            torch.testing.assert_close(sin, want_sin, atol=0, rtol=0)
