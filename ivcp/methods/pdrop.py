"""PDrop (PyramidDrop, Xing et al., CVPR 2025): visual tokens dropped in stages.

``stage_layers`` are the first layers that run without each stage's dropped tokens (0-based):
PDrop's layers {8, 16, 24} are K = 8, 16, 24 — the reading that reproduces the average tokens the
IVC-Prune paper reports for PDrop (Qwen2.5-VL-7B, λ 0.7 / 0.5 / 0.5: (8 + 8·0.7 + 8·0.35 + 4·0.175) / 28
= 61 %; LLaVA-1.5-7B, λ 0.5 each: (8 + 4 + 2 + 1) / 32 = 47 %). At each stage the remaining visual
tokens are ranked by the last prompt token's attention recomputed with layer K's input norm, q/k
projections and rotary (mean over heads); ``stage_ratios[i]`` of them stay (round; every image keeps
at least its best token). Earlier layers keep their KV cache (each layer caches what it processed).

``position_policy``: ``keep`` (default: kept tokens keep their original ids, best for grounding) or
``renumber`` (PDrop's code, ``modeling_llama_pdrop.py``: after each drop the prompt's positions close the
gap — 0..n−1 for 1-D RoPE; for M-RoPE every id of a kept token moves down by the number of tokens dropped
before it — and while decoding, a layer after stage s takes the unpruned ids minus the tokens dropped by
stages ≤ s, as PDrop's decode loop shifts ``position_ids`` at each stage's layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import keep_count, top_covering, top_k
from .base import PruningMethod, check_choice
from .registry import register_method

POSITION_POLICIES = ("keep", "renumber")


@register_method
@dataclass
class PDrop(PruningMethod):
    name: ClassVar[str] = "pdrop"
    trims_earlier_layers: ClassVar[bool] = False
    source: ClassVar[str] = """\
Paper: Xing et al., CVPR 2025. Code: Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py (LLaVA only).
Stages after layers {8, 16, 24} (ivcp: K = 8, 16, 24, the first layers without the dropped tokens),
last-instruction-token attention with layer K's norm, q/k and rotary, mean over heads.
position_policy="renumber" (the source; LLaVA's default in configs/models/llava.toml): positions close up after each stage and
decoding moves down by the tokens dropped so far at each layer. Default "keep": original ids (grounding).
Deviations: round(lambda * remaining) (the source: int of a per-stage count); every image keeps its best
token; several images ranked together. Other families: the same rule (no source code for them)."""

    selection_layer: int | None = None  # unused: see stage_layers
    stage_layers: tuple[int, ...] | None = None
    stage_ratios: tuple[float, ...] | None = None
    position_policy: str = "keep"

    def __post_init__(self) -> None:
        check_choice(self.name, "position_policy", self.position_policy, POSITION_POLICIES)
        if self.stage_layers is not None:
            self.stage_layers = tuple(self.stage_layers)
            self.selection_layer = self.stage_layers[0] if self.stage_layers else None
        if self.stage_ratios is not None:
            self.stage_ratios = tuple(self.stage_ratios)

    def selection_layers(self) -> list[int]:
        return list(self.stage_layers)

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if len(self.stage_layers) != len(self.stage_ratios):
            raise ValueError(f"{self.name}: {len(self.stage_layers)} stage_layers but {len(self.stage_ratios)} "
                             "stage_ratios")

    def rank(self, ctx) -> torch.Tensor:
        """Present visual tokens, best first, by the last token's attention at layer K."""
        visual, scores = ctx.last_token_attention(ctx.layer)
        return visual[top_k(scores, visual.numel())]

    def keep_count(self, ctx) -> int:
        return keep_count(self.stage_ratios[ctx.stage], ctx.visual_tokens().numel())

    def select(self, ctx) -> torch.Tensor:
        return top_covering(self.rank(ctx), self.keep_count(ctx), ctx.segments)
