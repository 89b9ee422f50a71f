"""IVC-Prune's selection rule on hand-built signals (a stand-in context, no model)."""

import pytest
import torch

from ivcp.adapters import RopeSpec, Segment
from ivcp.methods.ivc_prune import IVCPrune
from ivcp.scoring import foreground_scores, ivc_scores, ivc_token_set, top_k


class FakeContext:
    """Positions of a grid image after `offset` text tokens, random value vectors."""

    def __init__(self, rows, cols, n_text=4, offset=3, seed=0):
        self.rope = RopeSpec(1_000_000.0, 16, (2, 3, 3))
        self.device = torch.device("cpu")
        self.segment = Segment(offset, offset + rows * cols, rows, cols)
        self.segments = [self.segment]
        n = offset + rows * cols + n_text
        g = torch.Generator().manual_seed(seed)
        self.value_table = torch.randn(1, 2, n, 16, generator=g)
        self.text = torch.arange(self.segment.end, n)
        self.pos = torch.stack([torch.full((rows * cols,), offset),
                                offset + torch.arange(rows).repeat_interleave(cols),
                                offset + torch.arange(cols).repeat(rows)])
        self.marks = {}

    def positions(self, segment):
        return self.pos

    def text_queries(self, segment, offset=0):
        return self.text

    def values(self, tokens, layer=None, norm=True):
        return self.value_table[:, :, tokens]

    def mark(self, name, tokens):
        self.marks[name] = tokens


def expected_reference(ctx, keep_ratio, ivc_ratio, seed_ratio):
    v, u = ivc_scores(ctx.pos, ctx.rope)
    ivc = set(ivc_token_set(v, u, ivc_ratio).tolist())
    _, seeds, f = foreground_scores(ctx.values(ctx.text)[0], ctx.values(ctx.segment.indices())[0], seed_ratio)
    keep = ivc | set(seeds.tolist())
    for j in top_k(f, f.numel()).tolist():
        if len(keep) >= round(keep_ratio * ctx.segment.n):
            break
        keep.add(j)
    return sorted(keep), ivc, set(seeds.tolist())


@pytest.mark.parametrize("rows,cols", [(6, 8), (1, 1), (1, 3), (5, 5)])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.3, 0.5, 1.0])
def test_reference_fill(rows, cols, keep_ratio):
    ctx = FakeContext(rows, cols)
    method = IVCPrune(selection_layer=2, keep_ratio=keep_ratio, ivc_ratio=0.1, seed_ratio=0.01)
    kept = method.select_segment(ctx, ctx.segment).tolist()
    expected, ivc, seeds = expected_reference(ctx, keep_ratio, 0.1, 0.01)
    assert kept == expected
    n = rows * cols
    assert len(kept) == max(round(keep_ratio * n), len(ivc | seeds))
    assert ivc | seeds <= set(kept)
    assert len(seeds) >= 1


def test_budget_counts_small_segments():
    # N = 1: budget round(0.5) = 0, but the one seed stays
    ctx = FakeContext(1, 1)
    assert IVCPrune(selection_layer=1, ivc_ratio=0.1).select_segment(ctx, ctx.segment).tolist() == [0]
    # N = 3: budget round(1.5) = 2 (ivc count round(0.3) = 0, one seed, one by f)
    ctx = FakeContext(1, 3)
    assert len(IVCPrune(selection_layer=1, ivc_ratio=0.1).select_segment(ctx, ctx.segment)) == 2
    # ratio 1 keeps everything
    ctx = FakeContext(4, 4)
    assert IVCPrune(selection_layer=1, keep_ratio=1.0, ivc_ratio=0.1).select_segment(ctx, ctx.segment).tolist() == list(range(16))


def test_paper_union():
    ctx = FakeContext(6, 8)
    method = IVCPrune(selection_layer=2, ivc_ratio=0.1, foreground_ratio=0.4, budget_mode="paper_union")
    kept = set(method.select_segment(ctx, ctx.segment).tolist())
    v, u = ivc_scores(ctx.pos, ctx.rope)
    ivc = set(ivc_token_set(v, u, 0.1).tolist())
    _, _, f = foreground_scores(ctx.values(ctx.text)[0], ctx.values(ctx.segment.indices())[0], 0.01)
    assert kept == ivc | set(top_k(f, round(0.4 * 48)).tolist())


def test_ablations_without_ivc_or_foreground():
    ctx = FakeContext(6, 8)
    only_ivc = IVCPrune(selection_layer=2, ivc_ratio=0.1, use_foreground=False).select_segment(ctx, ctx.segment)
    v, u = ivc_scores(ctx.pos, ctx.rope)
    assert only_ivc.tolist() == ivc_token_set(v, u, 0.1).tolist()
    ctx = FakeContext(6, 8)
    no_ivc = IVCPrune(selection_layer=2, ivc_ratio=0.1, pattern="none").select_segment(ctx, ctx.segment)
    _, seeds, f = foreground_scores(ctx.values(ctx.text)[0], ctx.values(ctx.segment.indices())[0], 0.01)
    expected = set(seeds.tolist())
    for j in top_k(f, 48).tolist():
        if len(expected) == 24:
            break
        expected.add(j)
    assert set(no_ivc.tolist()) == expected
    assert "ivc" not in ctx.marks
    with pytest.raises(ValueError, match="keeps nothing"):
        IVCPrune(pattern="none", use_foreground=False)


def test_foreground_stage_one_only_uses_the_text_mean():
    ctx = FakeContext(6, 8)
    kept = IVCPrune(selection_layer=2, ivc_ratio=0.0, foreground_stages=1).select_segment(ctx, ctx.segment)
    s, _, _ = foreground_scores(ctx.values(ctx.text)[0], ctx.values(ctx.segment.indices())[0], 0.01)
    assert kept.tolist() == sorted(top_k(s, 24).tolist())
    assert ctx.marks["seed"].numel() == 0


@pytest.mark.parametrize("pattern,expected", [
    # 4 x 5 grid, row-major: corners 0, 4, 15, 19 and the centre (1, 2) = 7
    ("corners", [0, 4, 7, 15, 19]),
    # centres of the 3x3 windows: rows {1, 3}, columns {1, 4} -> 6, 9, 16, 19
    ("window", [6, 9, 16, 19]),
    # diagonals: columns round(r * 4 / 3) = 0, 1, 3, 4 and mirrors 4, 3, 1, 0
    ("diagonal", [0, 4, 6, 8, 11, 13, 15, 19]),
])
def test_patterns_by_hand(pattern, expected):
    from ivcp.patterns import pattern_tokens

    assert pattern_tokens(pattern, 4, 5).tolist() == expected
    ctx = FakeContext(4, 5)
    kept = IVCPrune(selection_layer=1, ivc_ratio=0.1, pattern=pattern, keep_ratio=0.0).select_segment(ctx, ctx.segment)
    assert set(expected) <= set(kept.tolist())
    assert ctx.marks["pattern"].tolist() == [3 + i for i in expected]


def test_random_pattern_is_seeded_and_sized():
    from ivcp.patterns import pattern_tokens

    a, b = pattern_tokens("random", 10, 10, 0.15), pattern_tokens("random", 10, 10, 0.15)
    assert torch.equal(a, b) and a.numel() == 15 and a.unique().numel() == 15


def test_marks_record_ivc_and_seeds():
    ctx = FakeContext(6, 8, offset=3)
    IVCPrune(selection_layer=2, ivc_ratio=0.1).select_segment(ctx, ctx.segment)
    v, u = ivc_scores(ctx.pos, ctx.rope)
    assert ctx.marks["ivc"].tolist() == (3 + ivc_token_set(v, u, 0.1)).tolist()
    assert ctx.marks["seed"].numel() == 1
