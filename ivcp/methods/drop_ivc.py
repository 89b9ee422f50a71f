"""Vanilla minus IVC tokens (IVC-Prune paper, Tab. 4): every visual token stays except the IVC set.

Shows what the implicit visual coordinates carry: the same tokens the IVC-Prune method keeps are
the only ones removed. Schedule and KV policy as IVC-Prune (selection at its layer K, earlier
layers' cache cut to the same set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import IVC_MODES
from .base import PruningMethod, check_choice
from .ivc_prune import ivc_tokens
from .registry import register_method


@register_method
@dataclass
class DropIVC(PruningMethod):
    name: ClassVar[str] = "drop_ivc"
    trims_earlier_layers: ClassVar[bool] = True

    selection_layer: int | None = None
    ivc_ratio: float | None = None
    ivc_mode: str = "reference"

    def __post_init__(self) -> None:
        check_choice(self.name, "ivc_mode", self.ivc_mode, IVC_MODES)

    def select_segment(self, ctx, segment) -> torch.Tensor:
        ivc = ivc_tokens(ctx, segment, self.ivc_ratio, self.ivc_mode)
        ctx.mark("ivc", segment.at(ivc))
        keep = torch.ones(segment.n, dtype=torch.bool, device=ctx.device)
        keep[ivc] = False
        return keep.nonzero().flatten()
