"""VScan (Zhang et al., 2025): token reduction in the vision encoder, then once more in the LLM.

Source: Tencent/SelfEvolvingAgent, ``VScan/`` — Qwen2.5-VL: ``qwen/model/qwen2_5_vl_custom.py`` and
``qwen2_5_vl_utils.py``; LLaVA-1.5: ``llava/model/multimodal_encoder/clip_encoder.py``,
``llava/model/llava_arch.py``, ``llava/model/modeling_llama_x.py``. Families VScan has no code for
(Qwen2-VL, Qwen3-VL, InternVL) take the Qwen rules.

Stage 1, before the LLM (our stage at layer 0, read from the vision tower), per segment of N merged tokens,
k = max(1, int(encoder_keep_ratio · N)) (the source's int):
- scores from a local block (Qwen: the first full-attention block, 7; LLaVA: CLIP block 5) and a global
  block (the last whose output reaches the LLM: Qwen's last block, LLaVA's feature layer −2 = block 22);
  ``encoder_signal="received"`` (Qwen): the attention each token receives, mean over heads and queries,
  pooled over its 2×2 merge group; ``"cls"`` (LLaVA): the CLS token's attention row, mean over heads;
- k // 2 tokens by windowed selection on the local score. ``window_rule="capped"`` (Qwen's
  ``window_selection``): floor(h/w_s) × floor(w/w_s) windows of side w_s = ``window`` (4), leftover rows /
  columns joining the last window, at most ceil((k // 2) / windows) per window, taken in descending local
  score (if the caps leave it short — the source asserts they never do — the rest in local-score order).
  ``"fixed"`` (LLaVA's ``window_cls_selection``): floor(h/6) × floor(w/6) windows of 6 × 6, each keeping
  exactly its top floor((k // 2) / windows) (leftover rows / columns belong to no window), so the local
  share can fall short of k // 2;
- k − k // 2 more by global score among the rest;
- every dropped token is averaged into its most cosine-similar kept token (similarity of the merged /
  projected features). Kept tokens keep their positions (``position_policy="keep"``, Qwen: the source
  filters the M-RoPE ids) or the positions close up as if the LLM had only been given the kept tokens
  (``"renumber"``, LLaVA: the source builds the input anew with ids 0..n−1).
Stage 2, at ``selection_layer`` K (the source's ``layer_list``: Qwen2.5-VL-7B 14, LLaVA 16): the first
layer without the dropped tokens, scored with *that* layer's input norm and q/k — the last prompt token's
attention, softmax over all present keys, mean over heads — without rotary (``llm_rotary=False``, Qwen:
the source comments it out) or with the current positions' rotary (LLaVA); the top
max(1, int(llm_keep_ratio · present)) visual tokens stay (every image keeps at least its best one).
With ``renumber`` the positions close up again, and decoding moves down as far at each layer (as the
source's decode loop does). Layers < K keep their cache of the stage-1 tokens.

Reference ratios: 0.167 in the encoder and 0.333 in the LLM (11 % overall); the IVC-Prune paper ran VScan
at about 50 % on average (RefCOCO: 0.6 and 0.67, the source's RefCOCO script). Deviations: scores in
float32 and ties to the lower index (the source: the model's dtype, torch.topk's order); several images or
frames each get their own encoder budget (the source handles one image); max(1, ·) so no image vanishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scoring import top_covering, top_k
from .base import PruningMethod, check_choice
from .registry import register_method

WINDOW_RULES = ("capped", "fixed")
ENCODER_SIGNALS = ("received", "cls")
POSITION_POLICIES = ("keep", "renumber")


def windowed_top(scores: torch.Tensor, grid_h: int, grid_w: int, k: int, window: int) -> torch.Tensor:
    """VScan's Qwen window selection: k local indices in descending score, at most ceil(k / windows) per
    window over floor(h/window) × floor(w/window) windows (leftover rows / columns join the last window;
    at least one window per axis); short → fill by score."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    n_h, n_w = max(1, grid_h // window), max(1, grid_w // window)
    cap = math.ceil(k / (n_h * n_w))
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    window_id = (rows // window).clamp(max=n_h - 1) * n_w + (cols // window).clamp(max=n_w - 1)
    taken = [0] * (n_h * n_w)
    chosen: list[int] = []
    order = top_k(scores, scores.numel()).tolist()
    for j in order:
        w = int(window_id[j])
        if taken[w] < cap:
            taken[w] += 1
            chosen.append(j)
            if len(chosen) == k:
                break
    if len(chosen) < k:
        have = set(chosen)
        chosen += [j for j in order if j not in have][: k - len(chosen)]
    return torch.tensor(chosen, dtype=torch.long)


def fixed_window_top(scores: torch.Tensor, grid_h: int, grid_w: int, k: int, window: int) -> torch.Tensor:
    """VScan's LLaVA window selection: floor(h/window) × floor(w/window) windows of window × window (at
    least one, clipped to the grid), each keeping its top floor(k / windows); window by window, row-major."""
    n_h, n_w = max(1, grid_h // window), max(1, grid_w // window)
    per = k // (n_h * n_w)
    index = torch.arange(grid_h * grid_w).view(grid_h, grid_w)
    picks = []
    for i in range(n_h):
        for j in range(n_w):
            members = index[i * window:(i + 1) * window, j * window:(j + 1) * window].flatten()
            picks.append(members[top_k(scores[members], per)])
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


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
    source: ClassVar[str] = """\
Paper: Zhang et al., 2025. Code: Tencent/SelfEvolvingAgent, VScan/.
Qwen2.5-VL (qwen/model/qwen2_5_vl_custom.py, qwen2_5_vl_utils.py): received attention of block 7 and the
last block, 2x2-pooled; window_selection on floor(h/4) x floor(w/4) windows, cap ceil(k/windows); merge;
M-RoPE ids kept; LLM stage at layer_list [14], scored with layer 14's norm and q/k, no rotary.
LLaVA-1.5 (clip_encoder.py, llava_arch.py, modeling_llama_x.py): the CLS row of CLIP blocks 5 and 22;
6x6 windows keeping floor(k/16) each; merge after the projector; input rebuilt, positions 0..n-1; LLM stage
at layer 16 with layer 16's q/k and rotary; positions renumbered again, decoding shifted per stage.
Qwen2-VL, Qwen3-VL, InternVL: no VScan code; the Qwen rules (InternVL / Qwen3-VL: their own local block).
Deviations: float32 scores, ties to the lower index; one encoder budget per image / frame (the source: one
image); max(1, .) so no image vanishes; position_policy="keep" on LLaVA keeps the original ids (option)."""
    bounds: ClassVar[dict[str, str]] = {"window": ">= 1"}

    selection_layer: int | None = None  # the LLM stage: the first layer without its dropped tokens
    encoder_keep_ratio: float = 0.167
    llm_keep_ratio: float = 0.333
    local_block: int | str = "auto"  # "auto": the model's default local block
    global_block: int | str = "auto"  # "auto": the last block whose output reaches the LLM
    window: int = 4
    window_rule: str = "capped"
    encoder_signal: str = "received"
    llm_rotary: bool = False
    position_policy: str = "keep"

    def __post_init__(self) -> None:
        check_choice(self.name, "window_rule", self.window_rule, WINDOW_RULES)
        check_choice(self.name, "encoder_signal", self.encoder_signal, ENCODER_SIGNALS)
        check_choice(self.name, "position_policy", self.position_policy, POSITION_POLICIES)

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

    def local_selection(self, scores: torch.Tensor, grid_h: int, grid_w: int, k: int) -> torch.Tensor:
        """Local indices of the windowed half of the encoder budget (``k`` = that half)."""
        rule = windowed_top if self.window_rule == "capped" else fixed_window_top
        return rule(scores, grid_h, grid_w, k, self.window)

    def _encoder_stage(self, ctx) -> torch.Tensor:
        local_block, global_block = self._blocks(ctx)
        kept = []
        for seg in ctx.segments:
            local = ctx.vision_attention(seg, local_block, self.encoder_signal).cpu()
            glob = ctx.vision_attention(seg, global_block, self.encoder_signal).cpu()
            k = max(1, int(self.encoder_keep_ratio * seg.n))
            first = self.local_selection(local, seg.grid_h, seg.grid_w, k // 2)
            rest = torch.ones(seg.n, dtype=torch.bool)
            rest[first] = False
            candidates = rest.nonzero().flatten()
            second = candidates[top_k(glob[candidates], k - k // 2)]
            local_kept = torch.sort(torch.cat([first, second])).values
            tokens = seg.indices(ctx.device)
            features = ctx.hidden_states(tokens)[0].float().cpu()
            merged = merge_into_kept(features, local_kept)
            ctx.update_hidden(seg.at(local_kept.to(ctx.device)), merged[None].to(ctx.device))
            kept.append(seg.at(local_kept.to(ctx.device)))
        return torch.cat(kept)

    def _llm_stage(self, ctx) -> torch.Tensor:
        visual, scores = ctx.last_token_attention(ctx.layer, rotary=self.llm_rotary)
        ranked = visual[top_k(scores, visual.numel())]
        return top_covering(ranked, max(1, int(self.llm_keep_ratio * visual.numel())), ctx.segments)
