"""Model adapters, one file per family; importing this package registers them all."""

from .base import ModelAdapter, RopeSpec, Segment, adapter_for, available_adapters, register_adapter
from . import deepseek_vl2, internvl, llava, qwen2_5_vl, qwen2_vl, qwen3_vl  # noqa: F401  (registration)

__all__ = ["ModelAdapter", "RopeSpec", "Segment", "adapter_for", "available_adapters", "register_adapter"]
