"""Window-FastV (Wen et al., 2025): FastV's score with the budget spread evenly over space.

Score = FastV's (last prompt token's attention at layer K−1, mean over heads). Each segment's merged
grid is tiled into windows; every window keeps max(1, round(keep_ratio · its tokens)) of its best
tokens; then the segment's total is trimmed (lowest scores first) or filled (highest unchosen
first) to round(keep_ratio · N). This corrects FastV's pull toward the bottom of the image.

The paper fixes no window size and there is no author code. Our reading, after the unused helper in
the IVC-Prune repository: window height / width = the divisor of the grid height / width closest to
``window_size`` (ties to the smaller divisor), so windows tile the grid exactly. Layers < K keep their
full KV cache; positions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import count, keep_count, top_k
from .base import PruningMethod
from .registry import register_method


def closest_divisor(n: int, target: int) -> int:
    """The divisor of n closest to target (the smaller one on a tie)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


def window_quota_selection(scores: torch.Tensor, grid_h: int, grid_w: int, keep_ratio: float,
                           window_size: int) -> torch.Tensor:
    """Local indices kept by the per-window quota rule, then trimmed/filled to round(keep_ratio·N)."""
    n = grid_h * grid_w
    win_h, win_w = closest_divisor(grid_h, window_size), closest_divisor(grid_w, window_size)
    index = torch.arange(n, device=scores.device).view(grid_h, grid_w)
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    for r in range(0, grid_h, win_h):
        for c in range(0, grid_w, win_w):
            members = index[r: r + win_h, c: c + win_w].flatten()
            quota = max(1, count(keep_ratio, members.numel()))
            chosen[members[top_k(scores[members], quota)]] = True
    budget = keep_count(keep_ratio, n)
    surplus = int(chosen.sum()) - budget
    if surplus > 0:  # drop the lowest-scored chosen tokens
        picked = chosen.nonzero().flatten()
        worst = torch.sort(scores[picked], stable=True).indices[:surplus]  # ties: lower index goes first
        chosen[picked[worst]] = False
    elif surplus < 0:  # add the best unchosen tokens
        rest = (~chosen).nonzero().flatten()
        chosen[rest[top_k(scores[rest], -surplus)]] = True
    return chosen.nonzero().flatten()


@register_method
@dataclass
class WindowFastV(PruningMethod):
    name: ClassVar[str] = "window_fastv"
    trims_earlier_layers: ClassVar[bool] = False

    selection_layer: int | None = 2
    keep_ratio: float = 0.5
    window_size: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"{self.name}: window_size must be a positive int, got {self.window_size!r}")

    def select(self, ctx) -> torch.Tensor:
        visual, scores = ctx.last_token_attention(ctx.layer - 1)
        by_token = dict(zip(visual.tolist(), range(visual.numel())))
        kept = []
        for seg in ctx.segments:
            seg_scores = scores[[by_token[t] for t in range(seg.start, seg.end)]]
            local = window_quota_selection(seg_scores, seg.grid_h, seg.grid_w, self.keep_ratio, self.window_size)
            kept.append(seg.start + local)
        return torch.cat(kept)
