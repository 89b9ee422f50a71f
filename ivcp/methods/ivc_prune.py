"""IVC-Prune (arXiv 2602.03060): implicit visual coordinate tokens + value-similarity foreground.

Per visual segment of N tokens, at layer K (signals from layer K−1):
- IVC tokens (eq. 5, 7, 8): V(m) = Σ_k cos(p(m)·θ_k), U(m) = Σ_k sin(p(m)·θ_k) from the token's
  absolute rotary ids; IVC = top round(ivc_ratio·N) by V ∪ top round(ivc_ratio·N) by U.
- Foreground (eq. 9, 10): A = mean_heads softmax(V_q·V_imgᵀ/√d) on layer K−1 value vectors; seeds =
  top max(1, round(seed_ratio·N)) of the mean over text rows; f = mean over text rows + seed rows.
- Budget: ``reference_fill`` (default, the authors' code): IVC ∪ seeds, then tokens by descending f
  until round(keep_ratio·N) (never fewer than IVC ∪ seeds). ``paper_union``: IVC ∪ top
  round(foreground_ratio·N) by f, keep_ratio unused.
Kept tokens keep their positions; the KV cache of layers < K is cut to the same set.

Differences from the reference code: scores in float64 (the reference uses bf16, where many ties
occur; ties break to the lower index here); text queries start right after the image's end marker
(the reference starts two tokens later); every image and video frame is pruned, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import IVC_MODES, count, fill_to_budget, foreground_scores, ivc_scores, ivc_token_set, top_k
from .base import PruningMethod, check_choice
from .registry import register_method

BUDGET_MODES = ("reference_fill", "paper_union")


@register_method
@dataclass
class IVCPrune(PruningMethod):
    """IVC-Prune; ``None`` fields come from the model's config (configs/<family>.toml)."""

    name: ClassVar[str] = "ivc_prune"
    trims_earlier_layers: ClassVar[bool] = True

    selection_layer: int | None = None
    keep_ratio: float = 0.5
    ivc_ratio: float | None = None
    seed_ratio: float = 0.01
    foreground_ratio: float | None = None
    ivc_mode: str = "reference"
    budget_mode: str = "reference_fill"
    use_ivc: bool = True
    use_foreground: bool = True

    def __post_init__(self) -> None:
        check_choice(self.name, "ivc_mode", self.ivc_mode, IVC_MODES)
        check_choice(self.name, "budget_mode", self.budget_mode, BUDGET_MODES)
        if not (self.use_ivc or self.use_foreground):
            raise ValueError(f"{self.name}: use_ivc and use_foreground cannot both be False")

    def select_segment(self, ctx, segment) -> torch.Tensor:
        n = segment.n
        device = ctx.device
        ivc = torch.empty(0, dtype=torch.long, device=device)
        if self.use_ivc:
            v, u = ivc_scores(ctx.positions(segment), ctx.rope, self.ivc_mode)
            ivc = ivc_token_set(v, u, self.ivc_ratio).to(device)
            ctx.mark("ivc", segment.start + ivc)
        if not self.use_foreground:
            return ivc
        text_values = ctx.values(ctx.text_queries(segment))[0]  # (kv_heads, L, d)
        image_values = ctx.values(segment.indices(device))[0]  # (kv_heads, N, d)
        _, seeds, f = foreground_scores(text_values, image_values, self.seed_ratio)
        ctx.mark("seed", segment.start + seeds)
        if self.budget_mode == "reference_fill":
            return fill_to_budget(torch.cat([ivc, seeds]), f, count(self.keep_ratio, n))
        return torch.unique(torch.cat([ivc, top_k(f, count(self.foreground_ratio, n))]))
