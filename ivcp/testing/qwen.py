"""Tiny Qwen2-VL / Qwen2.5-VL models (random weights).

The architecture is the real one (vision tower, 2x2 merger, M-RoPE decoder), only small; the image
processor is transformers' ``Qwen2VLImageProcessorPil`` (no torchvision).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from .common import build_tiny
from .tokenizer import byte_tokenizer

FAMILIES = ("qwen2_5_vl", "qwen2_vl")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's chat layout (system turn by default, images and videos wrapped in vision markers), written
# for the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Smallest sizes that keep every mechanism of the real models (GQA, M-RoPE sections, window
# attention in the 2.5 vision tower, the 2x2 merge).
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
)
_VISION_25 = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
)
_VISION_2 = dict(
    depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2,
)


def tiny_tokenizer():
    """The byte-level tokenizer with Qwen's special tokens (ids 256..263) and Qwen's chat layout."""
    return byte_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_processor(family: str = "qwen2_5_vl", min_pixels: int = 4 * 28 * 28,
                   max_pixels: int = 256 * 28 * 28) -> "TinyProcessor":
    """Processor for the tiny models: ``Qwen2VLImageProcessorPil`` + the byte tokenizer."""
    from transformers import Qwen2VLImageProcessorPil

    _check_family(family)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    return TinyProcessor(image_processor, tiny_tokenizer())


class TinyProcessor:
    """The part of Qwen's processor the tiny models need, without its torchvision-bound video half.

    ``processor(text=..., images=...)`` expands each ``<|image_pad|>`` to the image's merged token
    count, like ``Qwen2_5_VLProcessor``, and returns the same fields.
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        """Render one conversation (a list of turns) or a batch of them (a list of lists), as
        ``Qwen2_5_VLProcessor.apply_chat_template(..., tokenize=False)`` does."""
        if tokenize:
            raise ValueError("TinyProcessor.apply_chat_template only renders text; call the processor on it")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)

    def __call__(self, text, images=None, videos=None, return_tensors: str = "pt", padding: bool = True,
                 **kwargs) -> dict:
        if videos:
            raise ValueError("the tiny processor takes images only (build video inputs with ivcp.testing.make_inputs)")
        texts = [text] if isinstance(text, str) else list(text)
        data: dict = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            data.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            grids = iter(vision["image_grid_thw"].tolist())
            merge = self.image_processor.merge_size ** 2
            texts = [re.sub(re.escape(self.image_token),
                            lambda _: "<|placeholder|>" * (math.prod(next(grids)) // merge), t) for t in texts]
            texts = [t.replace("<|placeholder|>", self.image_token) for t in texts]
        ids = self.tokenizer(texts, return_tensors="pt", padding=padding and len(texts) > 1)
        data["input_ids"], data["attention_mask"] = ids["input_ids"], ids["attention_mask"]
        data["mm_token_type_ids"] = _mm_token_types(ids["input_ids"], self.tokenizer)
        return data

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)


def tiny_config(family: str = "qwen2_5_vl", vision_overrides: dict | None = None, **overrides: Any):
    """The tiny architecture's config; ``overrides`` go to the text config (e.g. num_hidden_layers),
    ``vision_overrides`` to the vision config."""
    _check_family(family)
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(_TEXT, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    text.update(overrides)
    attn = text.pop("attn_implementation", "sdpa")
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        vision = dict(_VISION_25, out_hidden_size=text["hidden_size"])
    else:
        from transformers import Qwen2VLConfig as Config
        vision = dict(_VISION_2, hidden_size=text["hidden_size"])
    vision.update(vision_overrides or {})
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    return config


def tiny_model(family: str = "qwen2_5_vl", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Build a tiny random Qwen2.5-VL / Qwen2-VL and its processor, deterministically from ``seed``.

    ``overrides`` change the text config (``num_hidden_layers=8``, ``attn_implementation="eager"``…).
    Returns ``(model, processor)``; the model is in eval mode.
    """
    config = tiny_config(family, **overrides)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2VLForConditionalGeneration as Model
    model = build_tiny(Model, config, seed, dtype)
    return model, tiny_processor(family)


def _mm_token_types(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_id] = 1
    types[input_ids == video_id] = 2
    return types


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
