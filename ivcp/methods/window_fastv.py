"""Window-FastV (Wen et al., 2025): FastV's score with the budget spread evenly over space.

Score = FastV's (last prompt token's attention at layer K−1, mean over heads). Each segment's merged
grid is tiled into windows; every window keeps max(1, round(keep_ratio · its tokens)) of its best
tokens; then the segment's total is trimmed (lowest scores first) or filled (highest unchosen
first) to round(keep_ratio · N). This corrects FastV's pull toward the bottom of the image.

The paper fixes no window size and there is no author code. The windows follow the (unused) helper in
the IVC-Prune repository (``DeepSeek-VL2/deepseek_vl2/models/modeling_deepseek.py``:
``_find_best_divisor``, ``_process_single_image_window``, ``_handle_boundary_windows``): per axis, the
divisor of the grid side in [``min_window_size``, ``max_window_size``] closest to ``window_size`` (ties
to the smaller); if none, ``window_size`` itself (clamped to that range), the grid then being tiled by
full windows from the top-left and smaller boundary windows — one per window row along the right edge,
one per window column along the bottom edge, and the corner. Divisor 1 is never taken (on a prime side,
e.g. 17 × 23, RefCOCO's 640 × 480 on Qwen2.5-VL, 1 × 1 windows would make the method FastV).
Our readings (the helper leaves them open): the range [3, 6] around 4, the global trim / fill (the
helper's total is what the quotas give), ties in the window top-k to the lower index.
Layers < K keep their full KV cache; positions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import count, keep_count, top_k
from .base import PruningMethod
from .registry import register_method


def window_side(n: int, target: int, lowest: int, highest: int) -> int:
    """The divisor of ``n`` in [lowest, highest] closest to ``target`` (ties: the smaller); if none,
    ``target`` clamped to [lowest, highest] (the grid then ends in smaller boundary windows)."""
    divisors = [d for d in range(lowest, highest + 1) if n % d == 0]
    if divisors:
        return min(divisors, key=lambda d: (abs(d - target), d))
    return max(lowest, min(target, highest))


def window_layout(grid_h: int, grid_w: int, window_size: int = 4, min_window_size: int = 3,
                  max_window_size: int = 6) -> list[tuple[int, int, int, int]]:
    """Windows as (row start, row end, column start, column end), in the helper's order: the full
    windows row by row, then the right-edge strip windows, the bottom-edge ones, the corner."""
    win_h = window_side(grid_h, window_size, min_window_size, max_window_size)
    win_w = window_side(grid_w, window_size, min_window_size, max_window_size)
    full_h, full_w = grid_h // win_h, grid_w // win_w
    rows = [(i * win_h, (i + 1) * win_h) for i in range(full_h)]
    cols = [(j * win_w, (j + 1) * win_w) for j in range(full_w)]
    windows = [(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]
    right = (full_w * win_w, grid_w) if grid_w % win_w else None
    bottom = (full_h * win_h, grid_h) if grid_h % win_h else None
    if right:
        windows += [(r0, r1, *right) for r0, r1 in rows]
    if bottom:
        windows += [(*bottom, c0, c1) for c0, c1 in cols]
    if right and bottom:
        windows.append((*bottom, *right))
    return windows


def window_quota_selection(scores: torch.Tensor, grid_h: int, grid_w: int, keep_ratio: float,
                           window_size: int = 4, min_window_size: int = 3, max_window_size: int = 6) -> torch.Tensor:
    """Local indices kept by the per-window quota rule, then trimmed/filled to round(keep_ratio·N)."""
    n = grid_h * grid_w
    index = torch.arange(n, device=scores.device).view(grid_h, grid_w)
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    for r0, r1, c0, c1 in window_layout(grid_h, grid_w, window_size, min_window_size, max_window_size):
        members = index[r0:r1, c0:c1].flatten()
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
    source: ClassVar[str] = """\
Paper: Wen et al., 2025 (no author code). All families, the same rule.
Windows: the unused helper in FireRedTeam/IVC-Prune, DeepSeek-VL2/deepseek_vl2/models/modeling_deepseek.py
(_find_best_divisor, _process_single_image_window, _handle_boundary_windows): a divisor in
[min_window_size, max_window_size] closest to window_size, else window_size with boundary strip windows;
max(1, round(keep_ratio * window tokens)) per window.
Deviations / our choices: the range [3, 6] and target 4 (the helper takes them as arguments, never set);
the total trimmed / filled by score to round(keep_ratio * N) (the helper keeps what the quotas give);
ties to the lower index."""
    bounds: ClassVar[dict[str, str]] = {"window_size": ">= 2", "min_window_size": ">= 2", "max_window_size": ">= 2"}

    selection_layer: int | None = 2
    keep_ratio: float = 0.5
    window_size: int = 4
    min_window_size: int = 3
    max_window_size: int = 6

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if not 2 <= self.min_window_size <= self.window_size <= self.max_window_size:
            raise ValueError(f"{self.name}: window sizes must satisfy 2 <= min_window_size <= window_size <= "
                             f"max_window_size, got {self.min_window_size}, {self.window_size}, {self.max_window_size}")

    def select(self, ctx) -> torch.Tensor:
        visual, scores = ctx.last_token_attention(ctx.layer - 1)
        by_token = dict(zip(visual.tolist(), range(visual.numel())))
        kept = []
        for seg in ctx.segments:
            seg_scores = scores[[by_token[t] for t in seg.indices().tolist()]]
            local = window_quota_selection(seg_scores, seg.grid_h, seg.grid_w, self.keep_ratio, self.window_size,
                                           self.min_window_size, self.max_window_size)
            kept.append(seg.at(local))
        return torch.cat(kept)
