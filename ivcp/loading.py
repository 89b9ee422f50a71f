"""Load a model and its processor from a name: ``tiny`` (offline), or a checkpoint path / hub id."""

from __future__ import annotations

import importlib.util

import torch

TINY_SPECS = ("tiny", "tiny:qwen2_5_vl", "tiny:qwen2_vl", "tiny:qwen3_vl", "tiny:qwen3_vl_moe", "tiny:llava", "tiny:internvl", "tiny:internvl_llama",
              "tiny:deepseek_vl2", "tiny:deepseek_vl2_mha",
              "tiny:grounder")


def load_model(spec: str = "tiny", dtype: str | torch.dtype = "auto", device: str | None = None,
               attn_implementation: str | None = None, pixels: tuple[int | None, int | None] | None = None,
               processor_kwargs: dict | None = None):
    """(model, processor) for ``spec``:

    - ``tiny`` or ``tiny:<family>`` (``qwen2_5_vl``, ``qwen2_vl``): the random offline model;
      ``tiny:grounder``: the trained tiny grounder shipped with ivcp (``ivcp.testing.tiny_grounder``);
      ``pixels`` = (min, max) sets the tiny processor's pixel bounds;
    - anything else: ``from_pretrained`` of a local directory or a hub id (``HF_HUB_OFFLINE=1`` is
      honoured by transformers), the processor with the checkpoint's own settings (plus
      ``processor_kwargs``, e.g. ``backend="pil"``). Qwen checkpoints' processors need torchvision
      (the eval extra).

    Device: CUDA when available, else CPU. Attention: flash_attention_2 on CUDA when flash-attn is
    installed, else sdpa.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "tiny" or spec.startswith("tiny:"):
        from .testing import tiny_grounder, tiny_model, tiny_processor

        if spec not in TINY_SPECS:
            raise ValueError(f"unknown tiny model {spec!r}; choose one of {', '.join(TINY_SPECS)}")
        attn = attn_implementation or "sdpa"
        if spec == "tiny:grounder":
            model, _ = tiny_grounder(attn_implementation=attn)
            family = "qwen2_5_vl"
        else:
            family = spec.split(":", 1)[1] if ":" in spec else "qwen2_5_vl"
            model, _ = tiny_model(family, attn_implementation=attn)
        bounds = [v for v in (pixels or ()) if v is not None]
        with_bounds = len(bounds) == 2 and family.startswith("qwen")
        processor = tiny_processor(family, *bounds) if with_bounds else tiny_processor(family)
        return model.to(device), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import models  # noqa: F401  (registers ivcp's model and processor classes with the Auto classes)

    if attn_implementation is None:
        flash = device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    if _model_type(spec) == "deepseek_vl2":  # ivcp's own class (scripts/convert_deepseek_vl2.py wrote the folder)
        from .models import DeepseekVL2ForConditionalGeneration
        from .models.deepseek_vl2_processor import DeepseekVL2Processor

        model = DeepseekVL2ForConditionalGeneration.from_pretrained(spec, dtype=dtype, attn_implementation=attn_implementation)
        return model.to(device).eval(), DeepseekVL2Processor.from_pretrained(spec)
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), AutoProcessor.from_pretrained(spec, **(processor_kwargs or {}))


def build_converted(model_class, config, state_dict: dict, dtype: str = "auto"):
    """``model_class(config)`` holding ``state_dict`` exactly (converted weights): built on the meta device,
    every key checked both ways (a missing or an unexpected key is a ValueError naming the first few), then
    the tensors assigned; cast to ``dtype`` unless "auto". The checkpoint converters' shared last step."""
    with torch.device("meta"):
        model = model_class(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"the converted weights do not fit the native class: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state_dict, assign=True, strict=True)
    return model if dtype == "auto" else model.to(getattr(torch, dtype))


def _model_type(spec: str) -> str | None:
    """``model_type`` of a local checkpoint folder's config.json (None for hub ids and other folders)."""
    import json
    import os

    path = os.path.join(spec, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("model_type")
