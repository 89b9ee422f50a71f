"""Qwen2-VL (transformers' ``Qwen2VLForConditionalGeneration``).

Same decoder layout, markers and M-RoPE as Qwen2.5-VL (see ``qwen2_5_vl.py``); only the vision tower
differs, which the engine does not touch. Video frames are grouped in pairs (temporal patch 2).
"""

from __future__ import annotations

from .base import register_adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter


@register_adapter
class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
