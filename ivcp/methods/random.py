"""Random (uniform) pruning: the floor every method must beat.

Each segment keeps round(keep_ratio·N) tokens (at least one) drawn uniformly without replacement from a generator
seeded with (seed, segment order). Schedule and KV policy as IVC-Prune (selection at the model's
IVC-Prune layer, earlier layers' cache cut too), so it compares at IVC-Prune's exact budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import keep_count
from .base import PruningMethod
from .registry import register_method


@register_method
@dataclass
class RandomPrune(PruningMethod):
    name: ClassVar[str] = "random"
    trims_earlier_layers: ClassVar[bool] = True

    selection_layer: int | None = None
    keep_ratio: float = 0.5
    seed: int = 0

    def select(self, ctx) -> torch.Tensor:
        kept = []
        for order, segment in enumerate(ctx.segments):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + order)
            local = torch.randperm(segment.n, generator=generator)[: keep_count(self.keep_ratio, segment.n)]
            kept.append(segment.at(local.to(ctx.device)))
        return torch.cat(kept) if kept else torch.empty(0, dtype=torch.long, device=ctx.device)
