"""FastV (Chen et al., ECCV 2024), the KV-cache-compatible variant.

Score of visual token j = attention of the last prompt token to j at layer K−1 (softmax over all
keys, mean over heads). Keep the top round(keep_ratio·N) visual tokens over all segments together
(keep_ratio = 1 − R; R = 0.5 by default), every image keeping at least its best token. Layers < K keep their full KV cache; positions are kept.
The row is computed from layer K−1's query and cached keys, so sdpa / flash-attn stay usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import keep_count, top_covering, top_k
from .base import PruningMethod
from .registry import register_method


@register_method
@dataclass
class FastV(PruningMethod):
    name: ClassVar[str] = "fastv"
    trims_earlier_layers: ClassVar[bool] = False

    selection_layer: int | None = 2
    keep_ratio: float = 0.5

    def rank(self, ctx) -> torch.Tensor:
        """Visual tokens, best first, by the last prompt token's attention at layer K−1."""
        visual, scores = ctx.last_token_attention(ctx.layer - 1)
        return visual[top_k(scores, visual.numel())]

    def keep_count(self, ctx) -> int:
        return keep_count(self.keep_ratio, ctx.visual_tokens().numel())

    def select(self, ctx) -> torch.Tensor:
        return top_covering(self.rank(ctx), self.keep_count(ctx), ctx.segments)
