"""IVC-Prune (arXiv 2602.03060): implicit visual coordinate tokens + value-similarity foreground.

Per visual segment of N tokens, at layer K (signals from layer K−1):
- IVC tokens (eq. 5, 7, 8): V(m) = Σ_k cos(p(m)·θ_k), U(m) = Σ_k sin(p(m)·θ_k) from the token's
  absolute rotary ids; IVC = top round(ivc_ratio·N) by V ∪ top round(ivc_ratio·N) by U.
- Foreground (eq. 9, 10): A = mean_heads softmax(V_q·V_imgᵀ/√d) on layer K−1 value vectors; seeds =
  top max(1, round(seed_ratio·N)) of the mean over text rows; f = mean over text rows + seed rows.
- Budget: ``reference_fill`` (default, the authors' Qwen code): IVC ∪ seeds, then tokens by
  descending f until round(keep_ratio·N) (never fewer than IVC ∪ seeds). ``paper_union``: IVC ∪ top
  round(foreground_ratio·N) by f, keep_ratio unused. ``reference_union`` (the authors' LLaVA code):
  IVC ∪ seeds ∪ top round(foreground_ratio·N) by f, no fill, keep_ratio unused.
Kept tokens keep their positions; the KV cache of layers < K is cut to the same set.

Differences from the reference code: scores in float64 (the reference uses bf16, where many ties
occur; ties break to the lower index here); text queries start right after the image's end marker
(the reference starts two tokens later); every image and video frame is pruned, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..patterns import PATTERNS, pattern_tokens
from ..scoring import (IVC_MODES, count, fill_to_budget, foreground_from_rows, foreground_scores, ivc_scores,
                       ivc_token_set, keep_count, top_k)
from .base import PruningMethod, check_choice
from .registry import register_method

BUDGET_MODES = ("reference_fill", "paper_union", "reference_union")
FOREGROUND_SIGNALS = ("value", "attention")
FOREGROUND_SOFTMAX = ("visual", "sequence")


def ivc_tokens(ctx, segment, ivc_ratio: float, ivc_mode: str) -> torch.Tensor:
    """Local indices of a segment's IVC tokens (top by V ∪ top by U)."""
    v, u = ivc_scores(ctx.positions(segment), ctx.rope, ivc_mode)
    return ivc_token_set(v, u, ivc_ratio).to(ctx.device)


@register_method
@dataclass
class IVCPrune(PruningMethod):
    """IVC-Prune; ``None`` fields come from the model's config (configs/models/<family>.toml).

    Ablations (paper tables) as options:
    - ``pattern`` (Tab. 4, 6): the positional tokens kept beside the foreground — ``ivc`` (default),
      ``none`` (IVC-Prune w/o IVC), ``random`` (``pattern_ratio`` of N), ``corners``, ``window``,
      ``diagonal`` (see :mod:`ivcp.patterns`); IVC 5/10/20 % is ``ivc_ratio``.
    - ``foreground_stages=1`` (Tab. 7, stage 1 only: f = s, no seeds);
      ``foreground_signal="attention"`` (Tab. 7: text→image attention of layer K−1 instead of value
      similarity); ``use_foreground=False`` keeps the pattern alone.

    The authors' per-family choices as options (configs/models/<family>.toml ``[authors.ivc_prune]``):
    ``foreground_softmax="sequence"`` (the value-similarity softmax over every prompt token, not only
    the segment's: LLaVA, InternVL), ``trim_layer0_kv=False`` (layer 0 keeps its whole cache: LLaVA),
    ``text_query_offset=2`` (text queries from two tokens after the segment, as all their code does;
    ours, 0, starts right after it, vision markup excluded).
    """

    name: ClassVar[str] = "ivc_prune"
    trims_earlier_layers: ClassVar[bool] = True

    selection_layer: int | None = None
    keep_ratio: float = 0.5
    ivc_ratio: float | None = None
    seed_ratio: float = 0.01
    foreground_ratio: float | None = None
    ivc_mode: str = "reference"
    budget_mode: str = "reference_fill"
    pattern: str = "ivc"
    pattern_ratio: float = 0.15
    foreground_stages: int = 2
    foreground_signal: str = "value"
    use_foreground: bool = True
    foreground_softmax: str = "visual"
    trim_layer0_kv: bool = True
    text_query_offset: int = 0

    def __post_init__(self) -> None:
        check_choice(self.name, "ivc_mode", self.ivc_mode, IVC_MODES)
        check_choice(self.name, "budget_mode", self.budget_mode, BUDGET_MODES)
        check_choice(self.name, "pattern", self.pattern, PATTERNS)
        check_choice(self.name, "foreground_stages", self.foreground_stages, (1, 2))
        check_choice(self.name, "foreground_signal", self.foreground_signal, FOREGROUND_SIGNALS)
        check_choice(self.name, "foreground_softmax", self.foreground_softmax, FOREGROUND_SOFTMAX)
        if isinstance(self.text_query_offset, bool) or not isinstance(self.text_query_offset, int) \
                or self.text_query_offset < 0:
            raise ValueError(f"{self.name}: text_query_offset must be a non-negative int, got {self.text_query_offset!r}")
        if self.pattern == "none" and not self.use_foreground:
            raise ValueError(f"{self.name}: pattern 'none' with use_foreground=False keeps nothing")

    def trimmed_layers(self, layer: int) -> range:
        return range(0 if self.trim_layer0_kv else 1, layer)

    def select_segment(self, ctx, segment) -> torch.Tensor:
        n = segment.n
        if self.pattern == "ivc":
            positional = ivc_tokens(ctx, segment, self.ivc_ratio, self.ivc_mode)
            ctx.mark("ivc", segment.start + positional)
        else:
            positional = pattern_tokens(self.pattern, segment.grid_h, segment.grid_w, self.pattern_ratio).to(ctx.device)
            ctx.mark("pattern", segment.start + positional)
        if not self.use_foreground:
            return positional
        seeds, f = self._foreground(ctx, segment)
        ctx.mark("seed", segment.start + seeds)
        if self.budget_mode == "reference_fill":
            return fill_to_budget(torch.cat([positional, seeds]), f, keep_count(self.keep_ratio, n))
        foreground = top_k(f, keep_count(self.foreground_ratio, n))
        if self.budget_mode == "reference_union":
            return torch.unique(torch.cat([positional, seeds, foreground]))
        return torch.unique(torch.cat([positional, foreground]))

    def _foreground(self, ctx, segment) -> tuple[torch.Tensor, torch.Tensor]:
        text, image = ctx.text_queries(segment, self.text_query_offset), segment.indices(ctx.device)
        if self.foreground_signal == "value":
            context = columns = None
            if self.foreground_softmax == "sequence":  # every present token is a key
                alive = ctx.alive
                context = ctx.values(alive)[0]
                columns = torch.searchsorted(alive, image)
            _, seeds, f = foreground_scores(ctx.values(text)[0], ctx.values(image)[0], self.seed_ratio,
                                            self.foreground_stages, context, columns)
        else:
            rows = lambda queries: ctx.attention(queries, image)[0].mean(0)  # noqa: E731  (Q, N)
            _, seeds, f = foreground_from_rows(rows(text), lambda seeds: rows(segment.start + seeds),
                                              self.seed_ratio, self.foreground_stages)
        return seeds.to(ctx.device), f
