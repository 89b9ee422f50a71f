"""VScan (Zhang et al., 2025): token reduction in the vision encoder, then once more in the LLM.

Stage 1, before the LLM (our stage at layer 0, read from the vision tower): each merged token's
score is the attention it receives (mean over heads and queries, pooled over its 2×2 merge group)
in a local block (the first full-attention block: 7 in Qwen2.5-VL) and in a global block (the last one
whose output reaches the LLM: the last block in Qwen-VL, the feature layer in LLaVA).
Per segment k = max(1, round(encoder_keep_ratio·N)): k // 2 tokens by windowed selection on the
local score (``window`` × ``window`` windows of the merged grid, at most ceil((k // 2) / 16) per window,
taken in descending local score; if the caps leave it short, the rest in local-score order), the
other k − k // 2 by global score among the rest. Every dropped token is averaged into its most
cosine-similar kept token (similarity of the merged features); the LLM then sees only the kept
tokens, at their original M-RoPE positions — exactly as if the encoder had emitted only those.
Stage 2, at ``selection_layer`` K (after layer 14 of 28: K = 15): the last prompt token's attention at
layer K−1 from its q/k *without rotary*, mean over heads; the top round(llm_keep_ratio · present)
visual tokens stay. Layers < K keep their cache of the stage-1 tokens.

Reference ratios: 0.167 in the encoder and 0.333 in the LLM (11 % overall); the IVC-Prune paper ran
VScan at about 50 % on average (RefCOCO: 0.6 and 0.67). Our readings where the description leaves a
choice: the per-window cap and the fall-back fill above, and max(1, ·) so no image vanishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import count, keep_count, top_covering, top_k
from .base import PruningMethod
from .registry import register_method


def windowed_top(scores: torch.Tensor, grid_h: int, grid_w: int, k: int, window: int) -> torch.Tensor:
    """k local indices in descending score, at most ceil(k/16) per window; short → fill by score."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    cap = math.ceil(k / 16)
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    window_id = (rows // window) * ((grid_w + window - 1) // window) + cols // window
    taken: dict[int, int] = {}
    chosen: list[int] = []
    order = top_k(scores, scores.numel()).tolist()
    for j in order:
        w = int(window_id[j])
        if taken.get(w, 0) < cap:
            taken[w] = taken.get(w, 0) + 1
            chosen.append(j)
            if len(chosen) == k:
                break
    if len(chosen) < k:
        rest = [j for j in order if j not in set(chosen)]
        chosen += rest[: k - len(chosen)]
    return torch.tensor(chosen, dtype=torch.long)


def merge_into_kept(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Average each dropped token into its most cosine-similar kept token: (len(kept), D) features,
    each = mean of itself and the dropped tokens assigned to it."""
    n = features.shape[0]
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept] = False
    merged = features[kept].double().clone()
    counts = torch.ones(kept.numel(), dtype=torch.float64)
    if dropped.any():
        unit = torch.nn.functional.normalize(features.double(), dim=-1)
        target = (unit[dropped] @ unit[kept].T).argmax(-1)  # first maximum on ties
        merged.index_add_(0, target, features[dropped].double())
        counts.index_add_(0, target, torch.ones(target.numel(), dtype=torch.float64))
    return merged / counts[:, None]


@register_method
@dataclass
class VScan(PruningMethod):
    name: ClassVar[str] = "vscan"
    trims_earlier_layers: ClassVar[bool] = False
    min_selection_layer: ClassVar[int] = 0

    selection_layer: int | None = None  # the LLM stage
    encoder_keep_ratio: float = 0.167
    llm_keep_ratio: float = 0.333
    local_block: int | str = "auto"  # "auto": the model's first full-attention block
    global_block: int | str = "auto"  # "auto": the last block whose output reaches the LLM
    window: int = 4

    def selection_layers(self) -> list[int]:
        return [0, self.selection_layer]

    def _blocks(self, model_facts) -> tuple[int, int]:
        """(local, global) block indices; ``model_facts`` is the adapter or a selection context."""
        local = model_facts.vision_local_block if self.local_block == "auto" else self.local_block
        depth = model_facts.vision_depth
        glob = (model_facts.vision_global_block if self.global_block == "auto" else self.global_block) % depth
        if not (0 <= local < depth):
            raise ValueError(f"{self.name}: local_block {local} is outside the vision tower's {depth} blocks")
        return local, glob

    def vision_blocks(self, adapter) -> list[int]:
        return list(self._blocks(adapter))

    def validate(self, num_layers: int) -> None:
        if self.selection_layer == 0:
            raise ValueError(f"{self.name}: selection_layer (the LLM stage) must be ≥ 1")
        super().validate(num_layers)

    def select(self, ctx) -> torch.Tensor:
        return self._encoder_stage(ctx) if ctx.stage == 0 else self._llm_stage(ctx)

    def _encoder_stage(self, ctx) -> torch.Tensor:
        local_block, global_block = self._blocks(ctx)
        kept = []
        for seg in ctx.segments:
            local = ctx.vision_attention(seg, local_block).cpu()
            glob = ctx.vision_attention(seg, global_block).cpu()
            k = max(1, count(self.encoder_keep_ratio, seg.n))
            first = windowed_top(local, seg.grid_h, seg.grid_w, k // 2, self.window)
            rest = torch.ones(seg.n, dtype=torch.bool)
            rest[first] = False
            candidates = rest.nonzero().flatten()
            second = candidates[top_k(glob[candidates], k - first.numel())]
            local_kept = torch.sort(torch.cat([first, second])).values
            tokens = seg.indices(ctx.device)
            features = ctx.hidden_states(tokens)[0].float().cpu()
            merged = merge_into_kept(features, local_kept)
            ctx.update_hidden(seg.start + local_kept.to(ctx.device), merged[None].to(ctx.device))
            kept.append(seg.start + local_kept.to(ctx.device))
        return torch.cat(kept)

    def _llm_stage(self, ctx) -> torch.Tensor:
        visual, scores = ctx.last_token_attention(ctx.layer - 1, rotary=False)
        ranked = visual[top_k(scores, visual.numel())]
        return top_covering(ranked, keep_count(self.llm_keep_ratio, visual.numel()), ctx.segments)
