"""Qwen2.5-VL (transformers' ``Qwen2_5_VLForConditionalGeneration``).

Layout: ``model.model`` is the multimodal model (vision tower ``visual`` + ``language_model``);
decoder layers at ``model.model.language_model.layers``; each layer has ``self_attn`` (q/k/v/o
projections with bias on q/k/v) and ``input_layernorm``. Visual tokens are runs of
``image_token_id`` / ``video_token_id`` between ``vision_start`` / ``vision_end`` markers; an image of
grid (t, h, w) patches gives t·h·w / merge² tokens in row-major order of the merged grid, a video
gives its frames one after the other. Rotary: M-RoPE with ``mrope_section`` over the t/h/w streams.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ModelAdapter, RopeSpec, Segment, mean_received, register_adapter


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """Qwen-VL's resize rule: both sides multiples of ``factor`` (patch 14 × merge 2), area within
    [min_pixels, max_pixels], aspect ratio kept as closely as those allow. Returns (height, width).
    Defaults: the pixel bounds of the reference grounding runs (4·28² … 16384·28²)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@register_adapter
class Qwen2_5_VLAdapter(ModelAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    @property
    def rope(self) -> RopeSpec:
        params = self._text_config.rope_parameters
        section = params.get("mrope_section") or [16, 24, 24]
        return RopeSpec(theta=float(params["rope_theta"]), head_dim=self.head_dim, mrope_section=tuple(section))

    # --- vision tower -------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    def vision_attention_module(self, block: int) -> nn.Module:
        return self.vision_tower.blocks[block].attn

    @property
    def vision_depth(self) -> int:
        return len(self.vision_tower.blocks)

    @property
    def vision_local_block(self) -> int:
        # the first full-attention block (7 of 32 in the released models): the blocks before it
        # attend inside windows only
        return int(self.model.config.vision_config.fullatt_block_indexes[0])

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Order of the merge groups inside the tower (window order); the identity without windows."""
        from transformers.vision_utils import get_vision_window_index

        cfg = self.model.config.vision_config
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=cfg.spatial_merge_size,
                                           window_size=cfg.window_size, patch_size=cfg.patch_size)
        return index

    @torch.no_grad()
    def received_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        args, kwargs = attention_call["args"], attention_call["kwargs"]
        grid_thw = tower_call["kwargs"].get("grid_thw", tower_call["args"][1] if len(tower_call["args"]) > 1 else None)
        attn = attention_call["module"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None).tolist()
        cos, sin = kwargs["position_embeddings"]
        n = hidden.shape[0]
        qkv = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3).float()  # (3, H, n, d)
        q, k = (self.rotate(x[None], cos.float()[None], sin.float()[None])[0] for x in (qkv[0], qkv[1]))
        received = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            received[start:end] = mean_received(q[:, start:end], k[:, start:end], attn.scaling)
        unit = self._merge ** 2
        pooled = received.view(-1, unit).mean(-1)  # merge groups, in the tower's (window) order
        raster = pooled[torch.argsort(self._window_index(grid_thw).to(pooled.device))]
        sizes = [int(h * w) // unit for t, h, w in grid_thw.tolist() for _ in range(int(t))]
        return list(torch.split(raster, sizes))

    @property
    def _merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def synthetic_inputs(self, image_size: tuple[int, int], text_before: torch.Tensor, text_after: torch.Tensor,
                         generator: torch.Generator) -> dict:
        cfg = self.model.config
        v = cfg.vision_config
        patch, merge, temporal = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        h, w = smart_resize(*image_size, factor=patch * merge)
        gh, gw = h // patch, w // patch
        input_ids = torch.cat([text_before, torch.tensor([cfg.vision_start_token_id]),
                               torch.full((gh * gw // merge ** 2,), cfg.image_token_id),
                               torch.tensor([cfg.vision_end_token_id]), text_after])[None]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == cfg.image_token_id).to(torch.int32),
                "pixel_values": torch.randn(gh * gw, 3 * temporal * patch * patch, generator=generator),
                "image_grid_thw": torch.tensor([[1, gh, gw]])}

    def vision_flops(self, inputs: dict) -> int:
        from ..analytic import VisionArch, vision_flops

        return vision_flops(VisionArch.from_config(self.model.config), [tuple(g) for g in inputs["image_grid_thw"].tolist()])

    @property
    def marker_token_ids(self) -> frozenset[int]:
        cfg = self.model.config
        ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
        return frozenset(i for i in ids if i is not None)

    def split_visual_inputs(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes) -> list[tuple]:
        """The grids list the batch's images (videos) row by row: each row takes as many as its tokens fill."""
        cfg = self.model.config
        split = {}
        for kind, token_id, grids in (("image", cfg.image_token_id, image_grid_thw),
                                      ("video", cfg.video_token_id, video_grid_thw)):
            if grids is None:
                split[kind] = [None] * input_ids.shape[0]
                continue
            sizes = [int(t * h * w) // self._merge ** 2 for t, h, w in grids.tolist()]
            rows, cursor = [], 0
            for count in (input_ids == token_id).sum(1).tolist():
                first, total = cursor, 0
                while total < count and cursor < len(sizes):
                    total, cursor = total + sizes[cursor], cursor + 1
                if total != count:
                    raise ValueError(f"a row has {count} {kind} tokens but its {kind}_grid_thw entries describe "
                                     f"{total}; pass the processor's input_ids together with its {kind}_grid_thw")
                rows.append(grids[first:cursor])
            if cursor != len(sizes):
                raise ValueError(f"{kind}_grid_thw lists {len(sizes)} {kind}s but the prompts hold only {cursor}")
            split[kind] = rows
        return [(images, videos, None) for images, videos in zip(split["image"], split["video"])]

    def segments(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                 video_grid_thw: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                 image_sizes=None) -> list[Segment]:
        cfg = self.model.config
        segments: list[Segment] = []
        for kind, token_id, grids in (("image", cfg.image_token_id, image_grid_thw),
                                      ("video", cfg.video_token_id, video_grid_thw)):
            positions = (input_ids == token_id).nonzero().flatten()
            if not positions.numel():
                continue
            if grids is not None:
                segments += self._segments_from_grids(kind, positions.tolist(), grids)
            elif position_ids is not None and position_ids.shape[0] == 3:
                segments += self._segments_from_positions(kind, positions, position_ids)
            else:
                raise ValueError(f"the prompt has {kind} tokens but neither {kind}_grid_thw nor M-RoPE position "
                                 "ids to tell their grid")
        return sorted(segments, key=lambda s: s.start)

    def _segments_from_grids(self, kind: str, positions: list[int], grids: torch.Tensor) -> list[Segment]:
        merge = self._merge
        grid_list = [tuple(int(v) for v in g) for g in grids]
        expected = sum(t * h * w // merge ** 2 for t, h, w in grid_list)
        if len(positions) != expected:
            raise ValueError(f"the prompt has {len(positions)} {kind} tokens but the {kind}_grid_thw describes "
                             f"{expected}; pass the processor's input_ids together with its {kind}_grid_thw")
        segments, cursor = [], 0
        for source, (t, h, w) in enumerate(grid_list):
            gh, gw = h // merge, w // merge
            for frame in range(t):
                span = positions[cursor: cursor + gh * gw]
                cursor += gh * gw
                if span[-1] - span[0] + 1 != len(span):
                    raise ValueError(f"{kind} {source} frame {frame}: its tokens are not contiguous in input_ids")
                segments.append(Segment(span[0], span[-1] + 1, gh, gw, kind, source, frame))
        return segments

    @staticmethod
    def _segments_from_positions(kind: str, positions: torch.Tensor, position_ids: torch.Tensor) -> list[Segment]:
        # Without the grids (transformers >= 5.23 encodes images before the prefill and drops them),
        # read them off the M-RoPE ids: a run of visual tokens is one image or video; inside it the
        # temporal id changes between frames, and the width id spans the merged grid's columns.
        segments: list[Segment] = []
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
        for source, run in enumerate(torch.tensor_split(positions, breaks.tolist())):
            t_ids = position_ids[0, run]
            frame_breaks = (t_ids[1:] != t_ids[:-1]).nonzero().flatten() + 1
            for frame, span in enumerate(torch.tensor_split(run, frame_breaks.tolist())):
                w_ids, h_ids = position_ids[2, span], position_ids[1, span]
                gw = int(w_ids.max() - w_ids.min()) + 1
                gh = int(h_ids.max() - h_ids.min()) + 1
                if gh * gw != span.numel():
                    raise ValueError(f"{kind} tokens at {int(span[0])}: position ids do not form a grid")
                segments.append(Segment(int(span[0]), int(span[-1]) + 1, gh, gw, kind, source, frame))
        return segments
