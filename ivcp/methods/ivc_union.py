"""Any ranking method "+ IVC" (IVC-Prune paper, Tab. 4: FastV + IVC, PDrop + IVC).

Wraps a method that ranks tokens (``rank(ctx)`` best first and ``keep_count(ctx)``: FastV, PDrop) and
keeps each segment's IVC tokens at every one of its stages:
- ``budget="extra"`` (default, the paper's "+ IVC"): the base method's choice ∪ the IVC tokens, so the
  count grows by the IVC tokens it would have dropped;
- ``budget="same"``: the IVC tokens first, then the base ranking until the base's own count.
Schedule, KV policy and position policy are the base method's.

    ivcp.prune(model, "ivc_union", base="pdrop", base_params={"position_policy": "renumber"})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..scoring import IVC_MODES, top_covering
from .base import PruningMethod, check_choice
from .ivc_prune import ivc_tokens
from .registry import make_method, register_method


@register_method
@dataclass
class IVCUnion(PruningMethod):
    name: ClassVar[str] = "ivc_union"

    base: str | PruningMethod = "fastv"
    base_params: dict[str, Any] = field(default_factory=dict)
    ivc_ratio: float | None = None
    ivc_mode: str = "reference"
    budget: str = "extra"

    def __post_init__(self) -> None:
        check_choice(self.name, "ivc_mode", self.ivc_mode, IVC_MODES)
        check_choice(self.name, "budget", self.budget, ("extra", "same"))
        self.base = make_method(self.base, **self.base_params)
        if not (hasattr(self.base, "rank") and hasattr(self.base, "keep_count")):
            raise ValueError(f"{self.name}: base method {self.base.name!r} does not rank tokens "
                             "(it needs rank() and keep_count(); FastV and PDrop do)")
        self.base_params = {}
        self.selection_layer = self.base.selection_layers()[0] if self.base.selection_layer is not None else None
        # the base method's mechanics, per instance
        self.trims_earlier_layers = self.base.trims_earlier_layers
        self.position_policy = getattr(self.base, "position_policy", "keep")

    def selection_layers(self) -> list[int]:
        return self.base.selection_layers()

    def resolve(self, lookup: Callable[[str], dict]) -> "IVCUnion":
        resolved = super().resolve(lookup)
        resolved.base = self.base.resolve(lookup)
        resolved.__post_init__()
        return resolved

    def validate(self, num_layers: int) -> None:
        self.base.validate(num_layers)
        super().validate(num_layers)

    def select(self, ctx) -> torch.Tensor:
        present = ctx.visual_tokens()
        ivc = torch.cat([seg.at(ivc_tokens(ctx, seg, self.ivc_ratio, self.ivc_mode)) for seg in ctx.segments])
        ivc = ivc[torch.isin(ivc, present)]
        ctx.mark("ivc", ivc)
        ranked = self.base.rank(ctx)
        budget = self.base.keep_count(ctx)
        if self.budget == "extra":
            return torch.unique(torch.cat([top_covering(ranked, budget, ctx.segments), ivc]))
        order = torch.cat([ivc, ranked[~torch.isin(ranked, ivc)]])
        return top_covering(order, max(budget, ivc.numel()), ctx.segments)

    def describe(self) -> dict:
        return {"method": self.name, "base": self.base.describe(), "ivc_ratio": self.ivc_ratio,
                "ivc_mode": self.ivc_mode, "budget": self.budget}
