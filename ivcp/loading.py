"""Load a model and its processor from a name: ``tiny`` (offline), or a checkpoint path / hub id."""

from __future__ import annotations

import importlib.util

import torch


def load_model(spec: str = "tiny", dtype: str | torch.dtype = "auto", device: str | None = None,
               attn_implementation: str | None = None):
    """(model, processor) for ``spec``:

    - ``tiny`` or ``tiny:<family>`` (``qwen2_5_vl``, ``qwen2_vl``): the random offline model;
    - anything else: ``from_pretrained`` of a local directory or a hub id (``HF_HUB_OFFLINE=1`` is
      honoured by transformers). Real checkpoints' processors need torchvision (the eval extra).

    Device: CUDA when available, else CPU. Attention: flash_attention_2 on CUDA when flash-attn is
    installed, else sdpa.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "tiny" or spec.startswith("tiny:"):
        from .testing import tiny_model

        family = spec.split(":", 1)[1] if ":" in spec else "qwen2_5_vl"
        model, processor = tiny_model(family, attn_implementation=attn_implementation or "sdpa")
        return model.to(device), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if attn_implementation is None:
        flash = device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), AutoProcessor.from_pretrained(spec)
