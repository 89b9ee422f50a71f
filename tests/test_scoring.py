"""IVC scores, counts, foreground and budget against hand-worked values."""

import math

import pytest
import torch

from ivcp.adapters import RopeSpec
from ivcp.scoring import count, fill_to_budget, foreground_scores, ivc_scores, ivc_token_set, top_k, value_attention

# theta = 1000, d = 6  ->  θ = (1, 0.1, 0.01); M-RoPE section (1, 1, 1): t→θ0, h→θ1, w→θ2
ROPE_1D = RopeSpec(theta=1000.0, head_dim=6)
ROPE_M = RopeSpec(theta=1000.0, head_dim=6, mrope_section=(1, 1, 1))


def v1(p):  # Σ_k cos(p θ_k), written out
    return math.cos(p) + math.cos(0.1 * p) + math.cos(0.01 * p)


def u1(p):
    return math.sin(p) + math.sin(0.1 * p) + math.sin(0.01 * p)


def test_theta_values():
    assert torch.allclose(ROPE_1D.inv_freq(), torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64))


def test_1d_scores_closed_form():
    v, u = ivc_scores(torch.tensor([0, 1, 2, 3]), ROPE_1D)
    # p = 0: every rotation is the identity: V = d/2 = 3, U = 0
    assert v[0].item() == 3.0 and u[0].item() == 0.0
    # p = 1: cos1 + cos.1 + cos.01 = 0.540302 + 0.995004 + 0.999950 = 2.535256
    assert v[1].item() == pytest.approx(2.535256, abs=1e-6)
    # p = 2: sin2 + sin.2 + sin.02 = 0.909297 + 0.198669 + 0.019999 = 1.127965
    assert u[2].item() == pytest.approx(1.127965, abs=1e-6)
    assert torch.allclose(v, torch.tensor([v1(p) for p in range(4)], dtype=torch.float64))
    assert torch.allclose(u, torch.tensor([u1(p) for p in range(4)], dtype=torch.float64))
    assert v.dtype == torch.float64


def _grid_positions(t, h0, w0, rows, cols):
    pos = [(t, h0 + r, w0 + c) for r in range(rows) for c in range(cols)]
    return torch.tensor(pos).T  # (3, N)


def test_mrope_reference_mode_sums_all_frequencies_over_streams():
    pos = _grid_positions(5, 5, 5, 2, 3)  # an image after 5 text tokens: t = 5, h = 5 + row, w = 5 + col
    v, u = ivc_scores(pos, ROPE_M, "reference")
    expected_v = [v1(t) + v1(h) + v1(w) for t, h, w in pos.T.tolist()]
    expected_u = [u1(t) + u1(h) + u1(w) for t, h, w in pos.T.tolist()]
    assert torch.allclose(v, torch.tensor(expected_v, dtype=torch.float64))
    assert torch.allclose(u, torch.tensor(expected_u, dtype=torch.float64))


def test_mrope_sectioned_mode_rotates_each_stream_by_its_section():
    pos = _grid_positions(5, 5, 5, 2, 3)
    v, u = ivc_scores(pos, ROPE_M, "sectioned")
    expected_v = [math.cos(t) + math.cos(0.1 * h) + math.cos(0.01 * w) for t, h, w in pos.T.tolist()]
    expected_u = [math.sin(t) + math.sin(0.1 * h) + math.sin(0.01 * w) for t, h, w in pos.T.tolist()]
    assert torch.allclose(v, torch.tensor(expected_v, dtype=torch.float64))
    assert torch.allclose(u, torch.tensor(expected_u, dtype=torch.float64))
    # token (5, 5, 5): cos5 + cos.5 + cos.05 = 0.283662 + 0.877583 + 0.998750
    assert v[0].item() == pytest.approx(2.159995, abs=1e-6)


def test_ties_break_to_lower_index():
    # 2x2 grid at offset 1: tokens 1 (h=1, w=2) and 2 (h=2, w=1) have equal reference scores
    pos = _grid_positions(1, 1, 1, 2, 2)
    v, u = ivc_scores(pos, ROPE_M, "reference")
    assert v[1] == v[2] and u[1] == u[2]
    assert top_k(torch.tensor([0.5, 0.7, 0.7, 0.1]), 2).tolist() == [1, 2]
    assert top_k(torch.tensor([0.7, 0.7, 0.7]), 1).tolist() == [0]
    order_v = top_k(v, 4).tolist()
    assert order_v.index(1) < order_v.index(2)


def test_counts_round_like_python():
    assert count(0.1, 25) == 2  # 2.5 rounds to even
    assert count(0.1, 35) == 4  # 3.5 rounds to even
    assert count(0.5, 3) == 2  # 1.5
    assert count(0.5, 1) == 0  # 0.5
    assert count(0.0, 100) == 0 and count(1.0, 7) == 7


def test_ivc_token_set_is_union_of_top_v_and_top_u():
    v = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    u = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], dtype=torch.float64)
    # ratio 0.2 of 10 -> 2 by V (0, 1) and 2 by U (9, 8)
    assert ivc_token_set(v, u, 0.2).tolist() == [0, 1, 8, 9]
    # overlap: V and U agree on the top -> union is smaller than 2k
    assert ivc_token_set(v, v, 0.3).tolist() == [0, 1, 2]


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _value_attention_by_hand(q, k):
    # q: H x Q x d, k: H x N x d nested lists; mean over heads of per-head softmax(q.k / sqrt d)
    heads, rows, n, d = len(q), len(q[0]), len(k[0]), len(q[0][0])
    out = [[0.0] * n for _ in range(rows)]
    for h in range(heads):
        for i in range(rows):
            logits = [sum(a * b for a, b in zip(q[h][i], k[h][j])) / math.sqrt(d) for j in range(n)]
            for j, p in enumerate(_softmax(logits)):
                out[i][j] += p / heads
    return out


def test_foreground_equals_equations_9_and_10():
    g = torch.Generator().manual_seed(3)
    text = torch.randn(2, 3, 4, generator=g)  # H=2 heads, L=3 text rows, d=4
    image = torch.randn(2, 7, 4, generator=g)  # N=7 image tokens
    s, seeds, f = foreground_scores(text, image, seed_ratio=0.3)  # round(2.1) = 2 seeds
    rows = _value_attention_by_hand(text.tolist(), image.tolist())
    s_hand = [sum(r[j] for r in rows) / 3 for j in range(7)]
    assert torch.allclose(s, torch.tensor(s_hand), atol=1e-6)
    seeds_hand = sorted(range(7), key=lambda j: (-s_hand[j], j))[:2]
    assert seeds.tolist() == seeds_hand
    seed_queries = [[image.tolist()[h][j] for j in seeds_hand] for h in range(2)]
    seed_rows = _value_attention_by_hand(seed_queries, image.tolist())
    f_hand = [sum(r[j] for r in rows + seed_rows) / 5 for j in range(7)]
    assert torch.allclose(f, torch.tensor(f_hand), atol=1e-6)
    assert torch.allclose(value_attention(text, image), torch.tensor(rows), atol=1e-6)


def test_at_least_one_seed():
    g = torch.Generator().manual_seed(0)
    _, seeds, _ = foreground_scores(torch.randn(1, 2, 4, generator=g), torch.randn(1, 3, 4, generator=g), 0.01)
    assert seeds.numel() == 1


def test_fill_to_budget_order_and_counts():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8])
    assert fill_to_budget(torch.tensor([3]), scores, 3).tolist() == [1, 3, 4]
    assert fill_to_budget(torch.tensor([3]), scores, 1).tolist() == [3]
    # the initial set is never cut, even over budget
    assert fill_to_budget(torch.tensor([0, 2, 3]), scores, 1).tolist() == [0, 2, 3]
    assert fill_to_budget(torch.tensor([], dtype=torch.long), scores, 5).tolist() == [0, 1, 2, 3, 4]
    # ties in the fill order go to the lower index
    assert fill_to_budget(torch.tensor([0]), torch.tensor([0.0, 0.5, 0.5, 0.5]), 3).tolist() == [0, 1, 2]
