"""AdaptPrune (Luan et al., 2025): attention × centre prior, then adaptive NMS on key similarity.

Source: bzluan/AdaptPrune, ``llava/model/language_model/adaptprune.py`` (LLaVA-1.5, 24 × 24 grid).
Per segment (grid h × w), at layer K (signals of layers K−1 and K):
- score = last prompt token's attention at layer K−1 (mean over heads) × a centred Gaussian prior: per
  axis of size s the coordinates are linspace(−s/2, s/2, s) (the source's linspace(−12, 12, 24): steps of
  24/23, no coordinate at 0), σ = s/2 (the source's 12), exp(−(x²/(2σ_h²) + y²/(2σ_w²))) divided by its
  maximum (peak 1 at the central cells);
- similarity = cosine of L2-normalised k_proj of layer K's input (no norm, no rotary, all heads
  concatenated);
- adaptive NMS until int(keep_ratio·N) (at least one; the source's int(576·ratio) = 57 at 0.1) are kept:
  take the best remaining token; every token within grid distance ``radius`` of it has its score
  multiplied by 1 − exp(−d²/(2·spatial_sigma²)) · exp(−(1 − cos)²/(2·similarity_sigma²)); the pick's
  score becomes 0.
Layers < K keep their full cache; positions are kept. Deviations: layer K−1 runs once (the source runs
it twice and duplicates its KV); scores in float64 (the source: the model's dtype); grids other than
24 × 24 (the source's only one) use the same rule per axis, symmetric about the centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import PruningMethod
from .registry import register_method


def centre_prior(grid_h: int, grid_w: int) -> torch.Tensor:
    """AdaptPrune's centre prior, (h·w,) row-major: coordinates linspace(−s/2, s/2, s) per axis, σ = s/2,
    the Gaussian divided by its maximum (see the module docstring)."""
    rows = torch.linspace(-grid_h / 2, grid_h / 2, grid_h, dtype=torch.float64)[:, None]
    cols = torch.linspace(-grid_w / 2, grid_w / 2, grid_w, dtype=torch.float64)[None, :]
    sigma_h, sigma_w = grid_h / 2, grid_w / 2
    prior = torch.exp(-(rows ** 2) / (2 * sigma_h ** 2) - (cols ** 2) / (2 * sigma_w ** 2))
    return (prior / prior.max()).flatten()


def adaptive_nms(scores: torch.Tensor, keys: torch.Tensor, grid_h: int, grid_w: int, keep: int,
                 radius: float = 5.0, spatial_sigma: float = 1.5, similarity_sigma: float = 0.05) -> torch.Tensor:
    """Indices picked by adaptive NMS, in pick order (see the module docstring).

    ``keys`` (N, D) are L2-normalised, so their dot products are the cosines; one row of the
    suppression is computed per pick (O(keep · N · D), no N × N matrix).
    """
    scores = scores.to(torch.float64).clone()
    keys = keys.to(torch.float64)
    rows = torch.arange(grid_h).repeat_interleave(grid_w).to(torch.float64)
    cols = torch.arange(grid_w).repeat(grid_h).to(torch.float64)
    available = torch.ones_like(scores, dtype=torch.bool)
    picks = []
    for _ in range(min(keep, scores.numel())):
        masked = torch.where(available, scores, torch.full_like(scores, -torch.inf))
        pick = int(torch.argmax(masked))  # first maximum: ties go to the lower index
        picks.append(pick)
        available[pick] = False
        dist2 = (rows - rows[pick]) ** 2 + (cols - cols[pick]) ** 2
        cosine = keys @ keys[pick]
        factor = 1 - torch.exp(-dist2 / (2 * spatial_sigma ** 2)) * torch.exp(-((1 - cosine) ** 2) / (2 * similarity_sigma ** 2))
        scores = torch.where(dist2 <= radius ** 2, scores * factor, scores)
        scores[pick] = 0.0
    return torch.tensor(picks, dtype=torch.long)


@register_method
@dataclass
class AdaptPrune(PruningMethod):
    name: ClassVar[str] = "adaptprune"
    trims_earlier_layers: ClassVar[bool] = False
    source: ClassVar[str] = """\
Paper: Luan et al., 2025. Code: bzluan/AdaptPrune, llava/model/language_model/adaptprune.py (LLaVA-1.5).
int(576 * ratio) tokens (57 at 0.1); centre prior linspace(-12, 12, 24), sigma 12, divided by its max; adaptive
NMS (distance <= 5, sigma 1.5, similarity sigma 0.05) on k_proj of layer K's input.
Deviations: layer K-1 runs once (the source runs it twice and duplicates its KV); float64 scores; other grids
(Qwen, InternVL: no source code) use linspace(-s/2, s/2, s) and sigma s/2 per axis."""
    bounds: ClassVar[dict[str, str]] = {"radius": ">= 0", "spatial_sigma": "> 0", "similarity_sigma": "> 0"}

    selection_layer: int | None = 2
    keep_ratio: float = 0.1
    radius: float = 5.0
    spatial_sigma: float = 1.5
    similarity_sigma: float = 0.05

    def select(self, ctx) -> torch.Tensor:
        visual, attention = ctx.last_token_attention(ctx.layer - 1)
        position = dict(zip(visual.tolist(), range(visual.numel())))
        kept = []
        for seg in ctx.segments:
            tokens = seg.indices(ctx.device)
            scores = attention[[position[t] for t in tokens.tolist()]].double().cpu() * centre_prior(seg.grid_h, seg.grid_w)
            keys = ctx.keys(tokens, layer=ctx.layer, norm=False, rotary=False)[0]  # (kv_heads, N, d)
            keys = torch.nn.functional.normalize(keys.transpose(0, 1).reshape(seg.n, -1), dim=-1).cpu()
            picks = adaptive_nms(scores, keys, seg.grid_h, seg.grid_w, max(1, int(self.keep_ratio * seg.n)),
                                 self.radius, self.spatial_sigma, self.similarity_sigma)
            kept.append(seg.at(picks.to(ctx.device)))
        return torch.cat(kept)
