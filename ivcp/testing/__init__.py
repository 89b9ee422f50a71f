"""Tiny, deterministic, offline models for tests, demos and benchmarks — one file per family.

Nothing here touches the hub: tokenizers are byte-level tokenizers built in memory (one token per
UTF-8 byte plus the family's special tokens), image processors are transformers' PIL ones (no
torchvision), weights come from a seeded generator (or, for the tiny grounder, from the checkpoint
shipped in ``ivcp/checkpoints``). The architectures are the real transformers classes, only small.

    model, processor = ivcp.testing.tiny_model("qwen2_5_vl")       # or "qwen2_vl", ...
    inputs = ivcp.testing.make_inputs(processor, "Where is it?", images=[ivcp.testing.make_image()])
"""

from __future__ import annotations

from typing import Any

import torch

from . import deepseek_vl2, internvl, llava, qwen, qwen3_vl
from .inputs import make_batch_inputs, make_image, make_inputs
from .grounder import GROUNDER_DIR, grounder_config, grounding_accuracy, tiny_grounder

# family -> module with tiny_config(**overrides), tiny_model(seed, dtype, **overrides), tiny_processor(...)
_BUILDERS = {family: module for module in (qwen, qwen3_vl, llava, internvl, deepseek_vl2) for family in module.FAMILIES}
FAMILIES = tuple(_BUILDERS)


def _builder(family: str):
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _BUILDERS[family]


def tiny_model(family: str = "qwen2_5_vl", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Build a tiny random model of ``family`` and its processor, deterministically from ``seed``.

    ``overrides`` change the text config (``num_hidden_layers=8``, ``attn_implementation="eager"``…).
    Returns ``(model, processor)``; the model is in eval mode.
    """
    return _builder(family).tiny_model(family, seed=seed, dtype=dtype, **overrides)


def tiny_processor(family: str = "qwen2_5_vl", *args, **kwargs):
    """The processor of a tiny family (offline; PIL image processing)."""
    return _builder(family).tiny_processor(family, *args, **kwargs)


def tiny_config(family: str = "qwen2_5_vl", **overrides: Any):
    """The tiny architecture's config of ``family``; ``overrides`` go to the text config."""
    return _builder(family).tiny_config(family, **overrides)


__all__ = ["FAMILIES", "GROUNDER_DIR", "grounder_config", "grounding_accuracy", "make_batch_inputs", "make_image",
           "make_inputs", "tiny_config", "tiny_grounder",
           "tiny_model", "tiny_processor"]
