"""Qwen2-VL (transformers' ``Qwen2VLForConditionalGeneration``).

Same decoder layout, markers and M-RoPE as Qwen2.5-VL (see ``qwen2_5_vl.py``); only the vision tower
differs: no window attention (every block attends over the whole image), so the tower keeps the
raster order of the merge groups.
"""

from __future__ import annotations

import torch

from .base import register_adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter


@register_adapter
class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    @property
    def vision_local_block(self) -> int:
        # every block attends globally; take the depth Qwen2.5-VL's first full-attention block has
        # (7 of 32)
        return int(7 * self.vision_depth / 32)

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        total = sum(int(t * h * w) for t, h, w in grid_thw.tolist()) // self._merge ** 2
        return torch.arange(total)
