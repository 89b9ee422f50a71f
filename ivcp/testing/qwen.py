"""Tiny Qwen2-VL / Qwen2.5-VL models (random weights).

The architecture is the real one (vision tower, 2x2 merger, M-RoPE decoder), only small; the image
processor is transformers' ``Qwen2VLImageProcessorPil`` (no torchvision).
"""

from __future__ import annotations

import functools
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


def tiny_processor(family: str = "qwen2_5_vl", min_pixels: int = 4 * 28 * 28, max_pixels: int = 256 * 28 * 28):
    """The family's own transformers processor (``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor``) around
    ``Qwen2VLImageProcessorPil`` and the byte tokenizer: ``apply_chat_template(tokenize=True)``,
    ``save_pretrained`` / ``AutoProcessor.from_pretrained`` and ``pipeline("image-text-to-text")`` work.
    See :func:`real_processor` for its video half."""
    from transformers import Qwen2VLImageProcessorPil

    _check_family(family)
    kwargs = dict(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=14, temporal_patch_size=2,
                  merge_size=2)
    name = "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"
    return real_processor(name, Qwen2VLImageProcessorPil(**kwargs), tiny_tokenizer(), CHAT_TEMPLATE,
                          "Qwen2VLVideoProcessor", kwargs)


def real_processor(class_name: str, image_processor, tokenizer, chat_template: str, video_class: str,
                   video_kwargs: dict):
    """transformers' processor ``class_name`` built from these parts. Its video processor needs
    torchvision: where torchvision is missing (the core install) the processor is the same class less its
    video half (:func:`image_only`), which refuses videos with a clear error."""
    import transformers
    from transformers.utils import is_torchvision_available

    cls = getattr(transformers, class_name)
    if is_torchvision_available():
        video = getattr(transformers, video_class)(**video_kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                   chat_template=chat_template)
    return image_only(cls)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


@functools.lru_cache(maxsize=None)
def image_only(cls):
    """A subclass of the processor class ``cls`` without its (torchvision-bound) video processor.
    ``save_pretrained`` writes ``cls``'s name, so ``AutoProcessor`` loads the stock class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.video_processor = None

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(f"this {cls.__name__} has no video processor (torchvision is not installed); build video "
                             "inputs with ivcp.testing.make_inputs")
        return cls.__call__(self, images=images, text=text, **kwargs)

    def to_dict(self):
        out = cls.to_dict(self)
        out["processor_class"] = cls.__name__
        return out

    return type(f"ImageOnly{cls.__name__}", (cls,), {"__init__": __init__, "__call__": __call__, "to_dict": to_dict,
                                                      "__module__": __name__, "__doc__": image_only.__doc__})


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


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
