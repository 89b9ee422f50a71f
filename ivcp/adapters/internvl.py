"""InternVL 2.5 / 3 (transformers' native ``InternVLForConditionalGeneration``: InternVL3-*-hf, and
InternVL2.5 checkpoints converted by ``scripts/convert_internvl.py``).

Layout: ``model.model`` is the multimodal model (InternViT ``vision_tower``, pixel-shuffle projector,
``language_model``: a Qwen2 or a Llama decoder — the converted InternLM2 of InternVL2.5-8B is a Llama);
decoder layers at ``model.model.language_model.layers``. Images are cut into 448-px tiles by InternVL's
dynamic tiling (the closest aspect ratio of cols × rows within 1 … max tiles), plus a 448-px thumbnail
of the whole image when there are several tiles; each tile gives 16 × 16 = 256 tokens (a raster of
2 × 2-patch cells). In the input: ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile (tiles row-major, the
thumbnail last) + ``</img>``; ``<img>`` / ``</img>`` are the ids just below ``<IMG_CONTEXT>`` in
InternVL's tokenizers. Each tile is a segment (its own 16 × 16 grid and positions); an image's tiles
and thumbnail form one unit. The tiles' layout (rows, cols) is not in the input ids: it is recomputed
from the image size (``image_sizes``) when given. Rotary: 1-D RoPE.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import GlobalAttentionTower, ModelAdapter, Segment, mean_received, register_adapter


def tile_grid(height: int, width: int, min_tiles: int = 1, max_tiles: int = 6, tile_size: int = 448,
              tiles: int | None = None) -> tuple[int, int]:
    """InternVL's dynamic tiling: the (cols, rows) of tiles whose aspect ratio is closest to the image's
    among all cols · rows in [min_tiles, max_tiles] (scanned by increasing count, then columns); on an
    exact tie the later arrangement wins if the image area exceeds half the tiles' area. With ``tiles``,
    only arrangements of that many tiles are considered (the layout of a known tile count)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    candidates = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                         if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    if tiles is not None:
        candidates = [(c, r) for c in range(1, tiles + 1) for r in range(1, tiles + 1) if c * r == tiles]
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def check_tile_count(size: tuple[int, int], parts: int, image: int = 0, tile_size: int = 448) -> None:
    """Refuse an image size (H, W) that InternVL's tiling cannot turn into ``parts`` token tiles (the tiles,
    plus the thumbnail when there are several) under any maximum tile count: the size contradicts the
    image's tokens, and the tiles' layout read from it would be wrong. ``tile_size``: the tiles' side in
    pixels (the tower's image size), which breaks ties between equally shaped layouts."""
    tiles = parts - 1 if parts > 1 else 1
    if parts == 2 or not any(math.prod(tile_grid(*size, 1, most, tile_size)) == tiles for most in range(tiles, 2 * tiles + 13)):
        height, width = size
        raise ValueError(f"image {image} of the prompt: its image_sizes entry {height}x{width} (height x width) cannot give its {parts} "
                         f"tiles of tokens by InternVL's tiling: the sizes do not belong to these image tokens")


@register_adapter
class InternVLAdapter(GlobalAttentionTower, ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)

    # --- the prompt ---------------------------------------------------------------------------
    @property
    def tokens_per_tile(self) -> int:
        return int(self.model.config.image_seq_length)

    @property
    def tile_side(self) -> int:
        side = math.isqrt(self.tokens_per_tile)
        if side * side != self.tokens_per_tile:
            raise ValueError(f"image_seq_length {self.tokens_per_tile} is not a square grid of tokens")
        return side

    @property
    def marker_token_ids(self) -> frozenset[int]:
        context = self.model.config.image_token_id
        return frozenset({context, context - 2, context - 1})  # <IMG_CONTEXT>, <img>, </img>

    def split_visual_inputs(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes) -> list[tuple]:
        """``image_sizes`` lists the batch's images row by row: each row takes one per image (run of tiles) it holds."""
        if image_sizes is None:
            return [(None, None, None)] * input_ids.shape[0]
        sizes = torch.as_tensor(image_sizes)
        context = self.model.config.image_token_id
        rows, cursor = [], 0
        for ids in input_ids:
            is_context = ids == context
            starts = int((is_context[1:] & ~is_context[:-1]).sum()) + int(is_context[0])
            rows.append((None, None, sizes[cursor: cursor + starts]))
            cursor += starts
        if cursor != sizes.shape[0]:
            raise ValueError(f"{sizes.shape[0]} image sizes for {cursor} images in the batch's prompts")
        return rows

    def segments(self, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                 position_ids: torch.Tensor | None = None, image_sizes=None) -> list[Segment]:
        context = self.model.config.image_token_id
        positions = (input_ids == context).nonzero().flatten()
        if not positions.numel():
            return []
        per_tile, side = self.tokens_per_tile, self.tile_side
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
        runs = torch.tensor_split(positions, breaks.tolist())
        sizes = None if image_sizes is None else [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
        if sizes is not None and len(sizes) != len(runs):
            raise ValueError(f"{len(sizes)} image sizes for {len(runs)} images in the prompt")
        segments: list[Segment] = []
        for source, run in enumerate(runs):
            start, n = int(run[0]), run.numel()
            if n % per_tile:
                raise ValueError(f"an image of {n} tokens at {start} is not a whole number of {per_tile}-token tiles")
            parts = n // per_tile
            if int(input_ids[start - 1]) != context - 2 or start + n >= input_ids.numel() or \
                    int(input_ids[start + n]) != context - 1:
                raise ValueError(f"the image tokens at {start} are not between <img> and </img>")
            layout = None
            if sizes is not None:
                check_tile_count(sizes[source], parts, source, self._vision_size("image_size"))
            if sizes is not None and parts > 1:
                cols, rows = tile_grid(*sizes[source], tiles=parts - 1)
                layout = (rows, cols)
            for part in range(parts):
                first = start + part * per_tile
                segments.append(Segment(first, first + per_tile, side, side, "image", source, 0, part, parts,
                                        thumbnail=parts > 1 and part == parts - 1, layout=layout))
        return segments

    def _vision_size(self, name: str) -> int:
        value = getattr(self.model.config.vision_config, name)  # an int, or (height, width)
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    # --- the benchmark -----------------------------------------------------------------------
    def synthetic_inputs(self, image_size: tuple[int, int], text_before: torch.Tensor, text_after: torch.Tensor,
                         generator: torch.Generator) -> dict:
        """One image of ``image_size`` (H, W) tiled as InternVL's processor does (6 tiles at most, the
        paper's benchmarks) + its thumbnail."""
        side = self._vision_size("image_size")
        cols, rows = tile_grid(*image_size, 1, 6, side)
        tiles = cols * rows + (cols * rows > 1)
        context = self.model.config.image_token_id
        input_ids = torch.cat([text_before, torch.tensor([context - 2]),
                               torch.full((tiles * self.tokens_per_tile,), context), torch.tensor([context - 1]),
                               text_after])[None]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.randn(tiles, 3, side, side, generator=generator),
                "image_sizes": torch.tensor([list(image_size)])}

    def vision_flops(self, inputs: dict) -> int:
        """InternViT over every tile (CLS included) + the projector on the pixel-shuffled tokens."""
        from ..analytic import vit_flops

        v = self.model.config.vision_config
        patches = (self._vision_size("image_size") // self._vision_size("patch_size")) ** 2
        hidden = self._text_config.hidden_size
        projector = 2 * self.tokens_per_tile * (4 * v.hidden_size * hidden + hidden * hidden)
        tiles = int(inputs["pixel_values"].shape[0])
        return tiles * (vit_flops(patches + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers) + projector)

    # --- the vision tower (InternViT: GlobalAttentionTower) -------------------------------------------
    def _vision_blocks(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layer

    def _block_attention(self, block: nn.Module) -> nn.Module:
        return block.attention

    @torch.no_grad()
    def received_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        """InternViT block attention received by each patch (mean over heads and all queries, CLS
        included as a query), pooled over each 2 × 2 pixel-shuffle cell: one (256,) tensor per tile."""
        args, kwargs = attention_call["args"], attention_call["kwargs"]
        attn = attention_call["module"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (tiles, 1 + patches, D)
        out = []
        for tile in hidden:
            q, k = attn.q_proj(tile), attn.k_proj(tile)
            if getattr(attn, "q_norm", None) is not None and not isinstance(attn.q_norm, nn.Identity):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q.view(tile.shape[0], attn.num_heads, -1).transpose(0, 1)
            k = k.view(tile.shape[0], attn.num_heads, -1).transpose(0, 1)
            patches = mean_received(q, k, attn.scale)[1:]
            side = math.isqrt(patches.numel())
            cells = patches.view(side // 2, 2, side // 2, 2).mean(dim=(1, 3))  # token (r, c) = patches 2r.., 2c..
            out.append(cells.flatten())
        return out
