"""IVC-Prune (arXiv 2602.03060): implicit visual coordinate tokens + value-similarity foreground.

Per image or video frame of N tokens (several segments for a tiled image: IVC per tile, the rest
over the whole image), at layer K (signals from layer K−1):
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
from ..scoring import (IVC_MODES, fill_to_budget, foreground_from_rows, foreground_scores, ivc_scores,
                       ivc_token_set, keep_count, top_k)
from .base import PruningMethod, check_choice
from .registry import register_method

BUDGET_MODES = ("reference_fill", "paper_union", "reference_union")
FOREGROUND_SIGNALS = ("value", "attention")
FOREGROUND_SOFTMAX = ("visual", "sequence", "span")
FOREGROUND_SOURCES = ("unit", "thumbnail")


def ivc_tokens(ctx, segment, ivc_ratio: float, ivc_mode: str) -> torch.Tensor:
    """Local indices of a segment's IVC tokens (top by V ∪ top by U)."""
    v, u = ivc_scores(ctx.positions(segment), ctx.rope, ivc_mode)
    return ivc_token_set(v, u, ivc_ratio).to(ctx.device)


def ivc_among(ctx, tokens: torch.Tensor, ivc_ratio: float, ivc_mode: str) -> torch.Tensor:
    """The IVC tokens (input indices) among any prompt tokens (sorted input indices), ranked together."""
    v, u = ivc_scores(ctx.positions_at(tokens), ctx.rope, ivc_mode)
    return tokens[ivc_token_set(v, u, ivc_ratio).to(tokens.device)]


def markup_after_rows(segment, unit) -> int:
    """How many markup tokens follow each row of a strided segment before the unit's next token (DeepSeek-VL2's
    newline column: 1 after the global view's rows and the last tile column's, 0 between tiles), read after its
    first row and at most ``row_stride − grid_w``; 0 for a contiguous segment."""
    room = segment.stride - segment.grid_w
    if room == 0:
        return 0
    last = segment.at(segment.grid_w - 1)
    later = torch.cat([s.indices() for s in unit])
    later = later[later > last]
    return room if not later.numel() else min(room, int(later.min()) - last - 1)


def with_markup(segment, unit) -> torch.Tensor:
    """Input indices of a segment's tokens and the markup after each of its rows (sorted): DeepSeek-VL2's global
    view with its newline column, h·(w + 1) positions. A contiguous segment: its own tokens."""
    markup = markup_after_rows(segment, unit)
    if markup == 0:
        return segment.indices()
    firsts = segment.at(torch.arange(segment.grid_h) * segment.grid_w)
    return (firsts[:, None] + torch.arange(segment.grid_w + markup)).flatten()


def mosaic_rows(tiles, markup: bool) -> list[torch.Tensor]:
    """Input indices of each row of a tiled image's mosaic (the tiles of one tile row side by side, ``layout`` =
    (rows, cols), tiles row-major), top to bottom; with ``markup``, with the markup after the row (DeepSeek-VL2's
    newline)."""
    rows, cols = tiles[0].layout
    if len(tiles) != rows * cols:
        raise ValueError(f"a {rows} x {cols} tile layout needs {rows * cols} tiles, the image has {len(tiles)}")
    out = []
    for tile_row in range(rows):
        row_tiles = tiles[tile_row * cols: (tile_row + 1) * cols]
        after = markup_after_rows(row_tiles[-1], tiles) if markup else 0
        for r in range(row_tiles[0].grid_h):
            cells = torch.cat([t.at(r * t.grid_w + torch.arange(t.grid_w)) for t in row_tiles])
            out.append(torch.cat([cells, int(cells[-1]) + 1 + torch.arange(after)]))
    return out


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
    the segment's: LLaVA, InternVL; ``"span"``: over the segment's rows with their markup, DeepSeek-VL2's
    global view with its newlines), ``trim_layer0_kv=False`` (layer 0 keeps its whole cache: LLaVA),
    ``text_query_offset=2`` (text queries from two tokens after the segment, as all their code does;
    ours, 0, starts right after it, vision markup excluded); ``value_norm=False`` (value vectors of the
    layer's input without its norm: InternVL); ``foreground_source="thumbnail"`` (InternVL: the
    foreground is chosen on the thumbnail and mapped onto the tiles, see ``_thumbnail_driven``);
    ``ivc_markup=True`` (a segment's IVC tokens ranked over its rows with the markup between them — the
    positions of DeepSeek-VL2's newline column compete too, and a pick there, kept anyway, uses up its share);
    ``mosaic_row_ivc_ratio`` > 0 (the tiles' IVC tokens chosen per row of the tile mosaic, this share of each
    row: DeepSeek-VL2, 0.15) instead of per tile; ``unit_budget=False`` (no budget over the image: the
    thumbnail's share, its foreground mapped onto the tiles and the tiles' IVC tokens: DeepSeek-VL2);
    ``map_seeds=True`` (the seeds are mapped onto the tiles with the rest of the thumbnail's foreground);
    ``skip_padding_cells=True`` (the thumbnail's cells that show only padding, ``Segment.padding_cells``, take
    no part in the seeds and the foreground ranking: DeepSeek-VL2's letterboxed global view).

    An image cut into tiles (InternVL) is one unit: IVC tokens per tile (its own positions), the
    foreground and the budget over all its tiles and its thumbnail together.
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
    value_norm: bool = True
    foreground_source: str = "unit"
    thumbnail_keep_ratio: float = 0.5
    ivc_markup: bool = False
    mosaic_row_ivc_ratio: float = 0.0
    unit_budget: bool = True
    map_seeds: bool = False
    skip_padding_cells: bool = False

    def __post_init__(self) -> None:
        check_choice(self.name, "ivc_mode", self.ivc_mode, IVC_MODES)
        check_choice(self.name, "budget_mode", self.budget_mode, BUDGET_MODES)
        check_choice(self.name, "pattern", self.pattern, PATTERNS)
        check_choice(self.name, "foreground_stages", self.foreground_stages, (1, 2))
        check_choice(self.name, "foreground_signal", self.foreground_signal, FOREGROUND_SIGNALS)
        check_choice(self.name, "foreground_softmax", self.foreground_softmax, FOREGROUND_SOFTMAX)
        check_choice(self.name, "foreground_source", self.foreground_source, FOREGROUND_SOURCES)
        if isinstance(self.text_query_offset, bool) or not isinstance(self.text_query_offset, int) \
                or self.text_query_offset < 0:
            raise ValueError(f"{self.name}: text_query_offset must be a non-negative int, got {self.text_query_offset!r}")
        if self.pattern == "none" and not self.use_foreground:
            raise ValueError(f"{self.name}: pattern 'none' with use_foreground=False keeps nothing")

    def trimmed_layers(self, layer: int) -> range:
        return range(0 if self.trim_layer0_kv else 1, layer)

    def select(self, ctx) -> torch.Tensor:
        kept = [self.select_unit(ctx, unit) for unit in ctx.units]
        return torch.cat(kept) if kept else torch.empty(0, dtype=torch.long, device=ctx.device)

    def select_segment(self, ctx, segment) -> torch.Tensor:
        """Local indices kept of a segment that is a whole image or frame."""
        return torch.searchsorted(segment.indices(ctx.device), self.select_unit(ctx, [segment]))

    def select_unit(self, ctx, segments) -> torch.Tensor:
        """Input indices kept of one image or frame (its segments: one, or a tiled image's tiles and
        thumbnail): positional tokens per segment, foreground and budget over the whole unit."""
        image = torch.sort(torch.cat([seg.indices(ctx.device) for seg in segments])).values
        positional = self._positional_unit(ctx, segments)
        if not self.use_foreground:
            return positional
        if self.foreground_source == "thumbnail":
            return self._thumbnail_driven(ctx, segments, image, positional)
        seeds, f = self._foreground(ctx, segments, image)
        ctx.mark("seed", image[seeds])
        positional = torch.searchsorted(image, positional)  # local to the unit from here on
        n = image.numel()
        if self.budget_mode == "reference_fill":
            return image[fill_to_budget(torch.cat([positional, seeds]), f, keep_count(self.keep_ratio, n))]
        foreground = top_k(f, keep_count(self.foreground_ratio, n))
        if self.budget_mode == "reference_union":
            return image[torch.unique(torch.cat([positional, seeds, foreground]))]
        return image[torch.unique(torch.cat([positional, foreground]))]

    def _positional_unit(self, ctx, segments) -> torch.Tensor:
        """Input indices of a unit's positional tokens (markup picks left out: markup is kept anyway)."""
        tiles = [s for s in segments if not s.thumbnail]
        by_rows = self.pattern == "ivc" and self.mosaic_row_ivc_ratio > 0 and 0 < len(tiles) < len(segments)
        if by_rows and tiles[0].layout is None:
            raise ValueError(f"{self.name}: mosaic_row_ivc_ratio needs the tiles' layout (rows, cols)")
        chosen = [self._positional(ctx, seg, segments) for seg in segments if not (by_rows and seg in tiles)]
        if by_rows:
            image = torch.cat([t.indices(ctx.device) for t in tiles])
            for row in mosaic_rows(tiles, self.ivc_markup):
                picks = ivc_among(ctx, row.to(ctx.device), self.mosaic_row_ivc_ratio, self.ivc_mode)
                picks = picks[torch.isin(picks, image)]
                ctx.mark("ivc", picks)
                chosen.append(picks)
        return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long, device=ctx.device)

    def _positional(self, ctx, segment, unit=()) -> torch.Tensor:
        """Input indices of a segment's positional tokens: its IVC tokens (with ``ivc_markup`` ranked with the
        markup after its rows, picks on markup left out) or an ablation pattern."""
        if self.pattern != "ivc":
            local = pattern_tokens(self.pattern, segment.grid_h, segment.grid_w, self.pattern_ratio).to(ctx.device)
            ctx.mark("pattern", segment.at(local))
            return segment.at(local)
        if self.ivc_markup and segment.row_stride is not None:
            picks = ivc_among(ctx, with_markup(segment, unit or [segment]).to(ctx.device), self.ivc_ratio,
                              self.ivc_mode)
            tokens = picks[torch.isin(picks, segment.indices(ctx.device))]
        else:
            tokens = segment.at(ivc_tokens(ctx, segment, self.ivc_ratio, self.ivc_mode))
        ctx.mark("ivc", tokens)
        return tokens

    def _foreground(self, ctx, segments, image, unit=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(seeds, refined score f) over ``image`` (the unit's input indices, sorted), local to it; text queries
        after the unit (``unit``: the whole image's segments when ``segments`` is a part of it)."""
        unit = segments if unit is None else unit
        text = ctx.text_queries(max(unit, key=lambda s: s.end), self.text_query_offset)
        if self.foreground_signal == "value":
            context = columns = None
            if self.foreground_softmax != "visual":  # keys: every present token, or the segments with their markup
                keys = ctx.alive if self.foreground_softmax == "sequence" else torch.sort(torch.cat(
                    [with_markup(s, unit).to(ctx.device) for s in segments])).values
                context = ctx.values(keys, norm=self.value_norm)[0]
                columns = torch.searchsorted(keys, image)
            _, seeds, f = foreground_scores(ctx.values(text, norm=self.value_norm)[0],
                                            ctx.values(image, norm=self.value_norm)[0], self.seed_ratio,
                                            self.foreground_stages, context, columns)
        else:
            rows = lambda queries: ctx.attention(queries, image)[0].mean(0)  # noqa: E731  (Q, N)
            _, seeds, f = foreground_from_rows(rows(text), lambda seeds: rows(image[seeds]), self.seed_ratio,
                                              self.foreground_stages)
        return seeds.to(ctx.device), f

    def _thumbnail_driven(self, ctx, segments, image, positional) -> torch.Tensor:
        """The authors' InternVL and DeepSeek-VL2 code: foreground chosen on the thumbnail (the segment marked
        ``thumbnail``, else the unit's last: InternVL's thumbnail, DeepSeek-VL2's global view) and mapped onto
        the tiles; the thumbnail keeps ``thumbnail_keep_ratio`` (its IVC tokens, filled by the refined score;
        with ``ivc_markup`` the share is of its positions with markup, and IVC picks on markup count); with
        ``unit_budget`` (InternVL) the unit keeps round(keep_ratio · N): under budget it is filled with
        thumbnail tokens by the refined score, over budget the lowest input indices are kept; without
        (DeepSeek-VL2) it keeps what was chosen."""
        thumb = next((s for s in segments if s.thumbnail), segments[-1])
        tiles = [s for s in segments if s is not thumb]
        if tiles and thumb.layout is None:
            raise ValueError(f"{self.name}: foreground_source='thumbnail' needs the tiles' layout (rows, cols): pass "
                             "the images' sizes (image_sizes=[(height, width), ...]) with the inputs")
        thumb_tokens = thumb.indices(ctx.device)
        ranked_tokens = thumb_tokens  # the cells that compete for seeds and foreground
        if self.skip_padding_cells and thumb.padding_cells:
            blank = thumb.at(torch.tensor(thumb.padding_cells, device=ctx.device))
            ranked_tokens = thumb_tokens[~torch.isin(thumb_tokens, blank)]
        seeds, f = self._foreground(ctx, [thumb], ranked_tokens, unit=segments)  # local to ranked_tokens
        seeds = ranked_tokens[seeds]
        ctx.mark("seed", seeds)
        ivc = positional[torch.isin(positional, thumb_tokens)]
        budget = keep_count(self.thumbnail_keep_ratio, thumb.n)
        if self.ivc_markup and self.pattern == "ivc":  # the authors' count: positions and picks with markup
            span = with_markup(thumb, segments).to(ctx.device)
            picks = ivc_among(ctx, span, self.ivc_ratio, self.ivc_mode)
            markup_picks = int((~torch.isin(picks, thumb_tokens)).sum())
            budget = keep_count(self.thumbnail_keep_ratio, span.numel()) - markup_picks
        competing = torch.isin(ivc, ranked_tokens)
        budget -= int((~competing).sum())  # positional tokens on padding cells count too
        kept = fill_to_budget(torch.searchsorted(ranked_tokens, ivc[competing]), f, budget)
        thumb_keep = torch.unique(torch.cat([ranked_tokens[kept], ivc]))
        chosen = [thumb_keep, positional[~torch.isin(positional, thumb_tokens)], seeds]
        if tiles:
            foreground = thumb_keep[~torch.isin(thumb_keep, ivc)]
            if self.map_seeds:
                foreground = torch.unique(torch.cat([foreground, seeds]))
            chosen.append(map_to_tiles(torch.searchsorted(thumb_tokens, foreground), thumb, tiles))
        priority = torch.unique(torch.cat(chosen))
        if not self.unit_budget:
            return priority
        target = keep_count(self.keep_ratio, image.numel())
        if priority.numel() >= target:
            return priority[:target]  # ascending input index: the thumbnail, then the later tiles, lose first
        ranked = ranked_tokens[top_k(f, ranked_tokens.numel())]
        return torch.cat([priority, ranked[~torch.isin(ranked, priority)][: target - priority.numel()]])


def map_to_tiles(thumbnail_tokens: torch.Tensor, thumbnail, tiles) -> torch.Tensor:
    """Input indices of the tile tokens under thumbnail tokens (local indices on the thumbnail's grid):
    thumbnail cell (r, c) covers rows r·R … r·R + R − 1 and columns c·C … c·C + C − 1 of the tiles'
    (grid_h·R) × (grid_w·C) mosaic, for a layout of R rows × C columns of tiles (row-major; each tile's rows
    ``row_stride`` apart in the sequence)."""
    rows, cols = thumbnail.layout
    gh, gw = thumbnail.grid_h, thumbnail.grid_w
    r, c = thumbnail_tokens // gw, thumbnail_tokens % gw
    dy, dx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    big_r = (r[:, None] * rows + dy.flatten()[None]).flatten()
    big_c = (c[:, None] * cols + dx.flatten()[None]).flatten()
    tile = (big_r // gh) * cols + big_c // gw
    starts = torch.tensor([t.start for t in tiles], device=thumbnail_tokens.device)
    strides = torch.tensor([t.stride for t in tiles], device=thumbnail_tokens.device)
    return starts[tile] + (big_r % gh) * strides[tile] + big_c % gw
