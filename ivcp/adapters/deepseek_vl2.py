"""DeepSeek-VL2 (ivcp's native ``DeepseekVL2ForConditionalGeneration``, from checkpoints converted by
``scripts/convert_deepseek_vl2.py``).

Layout: ``model.model`` holds the SigLIP ``vision_tower``, the projector and ``language_model`` (transformers'
DeepseekV2: multi-head latent attention, MoE); decoder layers at ``model.model.language_model.layers``.

One image's tokens (all carry the image token id): the global view's h rows of w tokens, each followed by a
newline; the view separator; the local mosaic's rows·h rows of cols·w tokens (the tiles of a tile row side by
side), each followed by a newline. Segments: the global view (part 0, ``thumbnail``, h × w with row stride
w + 1) and each local tile (parts 1 … rows·cols, row-major, h × w with row stride cols·w + 1: its rows are
interleaved with its neighbours' and the newline column); the newlines and the separator belong to no segment:
they are markup, always kept. An image's segments form one unit. The tiles' layout comes from the
``image_tiles`` input; without it, from the image's token count when that is unambiguous.

DeepSeek-VL2-Tiny (``use_mla`` false) has plain multi-head attention: per-head keys and values in the cache,
rotary over whole heads. Rotary (MLA): DeepseekV2 rotates the last ``qk_rope_head_dim`` dims of each query / key head as complex pairs, θ from
the config; the IVC scores use those dims (RopeSpec.head_dim = qk_rope_head_dim). The KV cache holds
compressed latents, so keys and values are recomputed from a layer's input: values are the value part of
``kv_b_proj`` (per head, ``v_head_dim``), keys the per-head no-rope part plus the shared rotary key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import GlobalAttentionTower, ModelAdapter, RopeSpec, Segment, mean_received, register_adapter


@register_adapter
class DeepseekVL2Adapter(GlobalAttentionTower, ModelAdapter):
    family = "deepseek_vl2"
    model_types = ("deepseek_vl2",)

    # --- shapes and rotary (multi-head latent attention; DeepSeek-VL2-Tiny: multi-head attention) -------
    @property
    def _mla(self) -> bool:
        return bool(getattr(self.model.config, "use_mla", True))

    @property
    def num_kv_heads(self) -> int:
        if not self._mla:
            return self._text_config.num_key_value_heads
        return self._text_config.num_attention_heads  # keys and values are per head after kv_b_proj

    @property
    def head_dim(self) -> int:
        cfg = self._text_config
        if not self._mla:
            return cfg.hidden_size // cfg.num_attention_heads
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim

    @property
    def rope(self) -> RopeSpec:
        params = getattr(self._text_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", getattr(self._text_config, "rope_theta", 10000.0))
        return RopeSpec(theta=float(theta), head_dim=int(self._text_config.qk_rope_head_dim))

    @property
    def cache_holds_heads(self) -> bool:
        return not self._mla  # MLA caches compressed latents

    def split_position_embeddings(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepseekV2's layers take one complex tensor e^{i·p·θ_k} (B, T, rope/2): (cos, sin) = (real, imag). (A
        transformers whose layers take a (cos, sin) pair gets it back as it came.)"""
        if isinstance(position_embeddings, (tuple, list)):
            self._pair_form = True
            return tuple(position_embeddings)
        self._pair_form = False
        return position_embeddings.real, position_embeddings.imag

    def join_position_embeddings(self, parts):
        cos, sin = parts
        return (cos, sin) if getattr(self, "_pair_form", False) else torch.complex(cos, sin)

    def rotary_embedding(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_position_embeddings(self.text_model.rotary_emb(hidden, position_ids[0]))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the last ``qk_rope_head_dim`` dims of ``x`` (B, heads, T, d) as consecutive (real, imag) pairs
        (multi-head attention: the whole head, Llama's rotate_half)."""
        if not self._mla:
            from ..models.deepseek_vl2 import DeepseekVL2MultiHeadAttention

            return DeepseekVL2MultiHeadAttention.rotate(x, cos, sin)
        half = int(self._text_config.qk_rope_head_dim) // 2
        if cos.shape[-1] == 2 * half:  # a (cos, sin) pair in rotate_half layout: each frequency twice
            cos, sin = cos[..., :half], sin[..., :half]
        nope = x.shape[-1] - 2 * half
        pe = x[..., nope:].float().reshape(*x.shape[:-1], -1, 2)
        real, imag = pe[..., 0], pe[..., 1]
        c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        turned = torch.stack([real * c - imag * s, real * s + imag * c], -1).flatten(-2)
        return torch.cat([x[..., :nope], turned.to(x.dtype)], -1)

    def project_heads(self, attention: nn.Module, which: str, hidden: torch.Tensor) -> torch.Tensor:
        """q: ``q_proj`` (or ``q_b_proj``·norm·``q_a_proj``); k: the per-head no-rope key from ``kv_b_proj`` and the
        shared rotary key (``kv_a_proj_with_mqa``'s tail) on every head; v: the value part of ``kv_b_proj``."""
        if not self._mla:
            return super().project_heads(attention, which, hidden)
        cfg = self._text_config
        b, t = hidden.shape[:2]
        heads, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if which == "q":
            q = attention.q_proj(hidden) if attention.q_proj is not None else \
                attention.q_b_proj(attention.q_a_layernorm(attention.q_a_proj(hidden)))
            return q.view(b, t, heads, nope + rope).transpose(1, 2)
        latent, k_rot = attention.kv_a_proj_with_mqa(hidden).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = attention.kv_b_proj(attention.kv_a_layernorm(latent)).view(b, t, heads, nope + cfg.v_head_dim)
        kv = kv.transpose(1, 2)
        if which == "v":
            return kv[..., nope:]
        if which == "k":
            return torch.cat([kv[..., :nope], k_rot[:, None].expand(b, heads, t, rope)], -1)
        raise ValueError(f"which must be q, k or v, got {which!r}")

    # --- the prompt ---------------------------------------------------------------------------
    @property
    def _side(self) -> int:
        return int(self.model.config.tokens_per_side)

    @property
    def marker_token_ids(self) -> frozenset[int]:
        return frozenset({int(self.model.config.image_token_id)})  # newline / separator positions carry it

    def layout_inputs(self, model_kwargs: dict):
        """Each image's (rows, cols) of local tiles (the ``image_tiles`` input), followed by its (height, width) when
        the inputs have ``image_sizes`` (the global view's letterbox: ``Segment.padding_cells``)."""
        tiles, sizes = model_kwargs.get("image_tiles"), model_kwargs.get("image_sizes")
        if tiles is None or sizes is None:
            return tiles
        tiles = torch.as_tensor(tiles).view(-1, 2)
        sizes = torch.as_tensor(sizes).view(-1, 2)
        if sizes.shape[0] != tiles.shape[0]:
            raise ValueError(f"image_sizes describes {sizes.shape[0]} images, image_tiles {tiles.shape[0]}")
        return torch.cat([tiles, sizes.to(tiles.device, tiles.dtype)], 1)

    @staticmethod
    def _rows(image_sizes) -> list[tuple[int, ...]]:
        """The images' rows of ``layout_inputs``: (rows, cols) or (rows, cols, height, width)."""
        table = torch.as_tensor(image_sizes)
        return [tuple(int(v) for v in g) for g in table.view(-1, table.shape[-1] if table.dim() > 1 else 2).tolist()]

    def padding_cells(self, height: int, width: int) -> tuple[int, ...]:
        """Cells of the global view that show only its letterbox padding, as the released processor (the authors'
        copy, ``tokenize_with_images``) finds them: the image scaled by min(S / W, S / H), sizes truncated, centred
        with floor division; a cell of (patch · downsample) px is padding when it overlaps none of the image."""
        config = self.model.config
        side, size = config.tokens_per_side, config.tile_size
        cell = config.vision_config.patch_size * config.downsample_ratio
        scale = min(size / width, size / height)
        w, h = int(width * scale), int(height * scale)
        left, top = (size - w) // 2, (size - h) // 2
        return tuple(i * side + j for i in range(side) for j in range(side)
                     if not (max(j * cell, left) < min(j * cell + cell, left + w)
                             and max(i * cell, top) < min(i * cell + cell, top + h)))

    def _grids(self) -> list[tuple[int, int]]:
        size = self.model.config.tile_size
        grids = {(h // size, w // size) for w, h in self.model.config.candidate_resolutions} | {(1, 1)}
        return sorted(grids)

    def _infer_layout(self, n: int, where: int) -> tuple[int, int]:
        matches = [g for g in self._grids() if self.model.config.image_token_count(*g) == n]
        if len(matches) != 1:
            raise ValueError(f"the image tokens at {where} ({n}) fit {len(matches)} tile layouts; pass image_tiles "
                             f"(the processor's output) to tell them apart")
        return matches[0]

    def _images(self, input_ids: torch.Tensor, layouts) -> list[tuple[int, tuple[int, int], tuple[int, int] | None]]:
        """(start, (rows, cols), (height, width) or None) of each image in one row, in order; ``layouts`` an iterator
        of the row's ``layout_inputs`` rows or None. Adjacent images form one run of image tokens, split by their layouts' token counts."""
        is_image = input_ids == int(self.model.config.image_token_id)
        positions = is_image.nonzero().flatten()
        if not positions.numel():
            return []
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
        images = []
        for run in torch.tensor_split(positions, breaks.tolist()):
            start, remaining = int(run[0]), run.numel()
            while remaining > 0:
                if layouts is None:
                    layout, size = self._infer_layout(remaining, start), None
                else:
                    row = next(layouts, None)
                    if row is None:
                        raise ValueError(f"more images in the prompt than image_tiles describes (at token {start})")
                    layout, size = tuple(row[:2]), (tuple(row[2:4]) if len(row) >= 4 else None)
                n = self.model.config.image_token_count(*layout)
                if n > remaining:
                    raise ValueError(f"image_tiles {layout} needs {n} image tokens at {start}, the prompt has {remaining}")
                images.append((start, layout, size))
                start, remaining = start + n, remaining - n
        return images

    def split_visual_inputs(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes) -> list[tuple]:
        """``image_sizes`` here is ``layout_inputs``: the batch's images row by row."""
        if image_sizes is None:
            return [(None, None, None)] * input_ids.shape[0]
        layouts = self._rows(image_sizes)
        width = len(layouts[0]) if layouts else 2
        rows, cursor = [], 0
        for ids in input_ids:
            it = iter(layouts[cursor:])
            count = len(self._images(ids, it))
            rows.append((None, None, torch.tensor(layouts[cursor: cursor + count]).view(-1, width)))
            cursor += count
        if cursor != len(layouts):
            raise ValueError(f"image_tiles describes {len(layouts)} images, the batch's prompts hold {cursor}")
        return rows

    def segments(self, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                 position_ids: torch.Tensor | None = None, image_sizes=None) -> list[Segment]:
        layouts = None if image_sizes is None else iter(self._rows(image_sizes))
        side = self._side
        segments: list[Segment] = []
        images = self._images(input_ids, layouts)
        if layouts is not None and next(layouts, None) is not None:
            raise ValueError(f"image_tiles describes more images than the prompt's {len(images)}")
        for source, (start, (rows, cols), size) in enumerate(images):
            parts = 1 + rows * cols
            segments.append(Segment(start, start + (side - 1) * (side + 1) + side, side, side, "image", source, 0, 0,
                                    parts, thumbnail=True, layout=(rows, cols), row_stride=side + 1,
                                    padding_cells=() if size is None else self.padding_cells(*size)))
            base, stride = start + side * (side + 1) + 1, cols * side + 1  # the mosaic after the separator
            for tile in range(rows * cols):
                first = base + (tile // cols) * side * stride + (tile % cols) * side
                segments.append(Segment(first, first + (side - 1) * stride + side, side, side, "image", source, 0,
                                        1 + tile, parts, layout=(rows, cols), row_stride=stride))
        self._layouts = [layout for _, layout, _ in images]
        return segments

    def batch_segments(self, input_ids, image_grid_thw, video_grid_thw, position_ids=None, image_sizes=None):
        out = super().batch_segments(input_ids, image_grid_thw, video_grid_thw, position_ids, image_sizes)
        self._batch_layouts = [layout for row in out for layout in
                               dict.fromkeys((s.source, s.layout) for s in row)]  # (source, layout) in order
        return out

    # --- the benchmark -----------------------------------------------------------------------
    def synthetic_inputs(self, image_size: tuple[int, int], text_before: torch.Tensor, text_after: torch.Tensor,
                         generator: torch.Generator) -> dict:
        """One image of ``image_size`` (H, W) tiled as the released processor does (one image: tiled)."""
        from ..models.deepseek_vl2 import select_resolution

        config = self.model.config
        width, height = select_resolution(image_size[1], image_size[0], config.candidate_resolutions)
        rows, cols = height // config.tile_size, width // config.tile_size
        image = torch.full((config.image_token_count(rows, cols),), int(config.image_token_id))
        input_ids = torch.cat([text_before, image, text_after])[None]
        side = config.tile_size
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.randn(1 + rows * cols, 3, side, side, generator=generator),
                "image_tiles": torch.tensor([[rows, cols]])}

    def vision_flops(self, inputs: dict) -> int:
        """SigLIP over every tile (global view and local tiles) + the projector on each tile's h × w cells."""
        from ..analytic import vit_flops

        config = self.model.config
        v = config.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        hidden, cells = config.text_config.hidden_size, config.tokens_per_side ** 2
        projector = 2 * cells * (v.hidden_size * config.downsample_ratio ** 2 * hidden
                                 + (config.projector_depth - 1) * hidden * hidden)
        tiles = int(inputs["pixel_values"].shape[0])
        return tiles * (vit_flops(patches, v.hidden_size, v.intermediate_size, v.num_hidden_layers) + projector)

    # --- the vision tower (SigLIP: GlobalAttentionTower) ----------------------------------------------

    @torch.no_grad()
    def received_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        """SigLIP block attention received by each patch (mean over heads and queries), averaged over each 2 × 2
        projector cell (the real patches of a padded cell), per segment: each image's global view, then its tiles
        (the tower's order)."""
        args, kwargs = attention_call["args"], attention_call["kwargs"]
        attn = attention_call["module"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (tiles, patches, D)
        ratio = self.model.config.downsample_ratio
        maps = []
        for tile in hidden:
            q = attn.q_proj(tile).view(tile.shape[0], attn.num_heads, -1).transpose(0, 1)
            k = attn.k_proj(tile).view(tile.shape[0], attn.num_heads, -1).transpose(0, 1)
            patches = mean_received(q, k, attn.scale)
            side = math.isqrt(patches.numel())
            cells = torch.nn.functional.avg_pool2d(patches.view(1, 1, side, side), ratio, ratio, ceil_mode=True)
            maps.append(cells[0, 0])  # (h, w); a padded cell averages its real patches only
        tiles = sum(1 + rows * cols for _, (rows, cols) in getattr(self, "_batch_layouts", []))
        if tiles != len(maps):
            raise ValueError(f"the vision tower encoded {len(maps)} tiles, the prompt's images have {tiles}")
        return [m.flatten() for m in maps]
