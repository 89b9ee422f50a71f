"""A tiny LLaVA-1.5 (random): CLIP-style vision tower, 2-layer MLP projector, Llama decoder.

The processor is transformers' own ``LlavaProcessor`` with ``CLIPImageProcessorPil`` (resize + centre
crop, no torchvision) and the byte tokenizer with ``</s>``, ``<pad>`` and ``<image>``; its chat template
renders like llava-hf's ("USER: <image>\\n{text} ASSISTANT:"). Images of 112 × 112 px give an 8 × 8
grid: 64 image tokens (the real model: 336 px, 24 × 24 = 576).
"""

from __future__ import annotations

from typing import Any

import torch

from .common import build_tiny
from .tokenizer import byte_tokenizer

FAMILIES = ("llava",)
SPECIAL_TOKENS = ("</s>", "<pad>", "<image>")
IMAGE_SIZE = 112
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_tokenizer():
    return byte_tokenizer(SPECIAL_TOKENS, eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def tiny_processor(family: str = "llava", image_size: int = IMAGE_SIZE):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def tiny_config(family: str = "llava", image_size: int = IMAGE_SIZE, **overrides: Any):
    from transformers import LlavaConfig

    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-6,
                eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.update(overrides)
    attn = text.pop("attn_implementation", "sdpa")
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32),
        text_config=text, image_token_id=ids["<image>"], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn
    return config


def tiny_model(family: str = "llava", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    from transformers import LlavaForConditionalGeneration

    config = tiny_config(family, **overrides)
    model = build_tiny(LlavaForConditionalGeneration, config, seed, dtype)
    return model, tiny_processor(family)
