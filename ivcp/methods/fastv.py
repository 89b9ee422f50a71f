"""FastV (Chen et al., ECCV 2024), the KV-cache-compatible variant.

Score of visual token j = attention of the last prompt token to j at layer K−1 (softmax over all
keys, mean over heads). Keep the top round(keep_ratio·N) visual tokens over all segments together
(keep_ratio = 1 − R; R = 0.5 by default). Layers < K keep their full KV cache; positions are kept.
The row is computed from layer K−1's query and cached keys, so sdpa / flash-attn stay usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import count, top_k
from .base import PruningMethod
from .registry import register_method


@register_method
@dataclass
class FastV(PruningMethod):
    name: ClassVar[str] = "fastv"
    trims_earlier_layers: ClassVar[bool] = False

    selection_layer: int | None = 2
    keep_ratio: float = 0.5

    def select(self, ctx) -> torch.Tensor:
        visual = ctx.visual_tokens()
        row = ctx.attention([ctx.last_token], visual, layer=self.selection_layer - 1)  # (B, H, 1, N)
        scores = row[0].mean(0)[0]
        return visual[top_k(scores, count(self.keep_ratio, visual.numel()))]
