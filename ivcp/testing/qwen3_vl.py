"""Tiny Qwen3-VL models (random weights): dense (``qwen3_vl``) and mixture-of-experts (``qwen3_vl_moe``).

The real architecture, small: q/k norms, interleaved M-RoPE, deepstack (the features of all three
vision blocks added after decoder layers 0, 1, 2 of 5), 16-px patches with a 2 × 2 merge (32 px per
token), a learned position embedding resampled to each image. The processor is transformers'
``Qwen3VLProcessor`` around ``Qwen2VLImageProcessorPil`` with Qwen3-VL's patch size and 0.5 mean / std;
the chat template is Qwen3's (no default system prompt).
"""

from __future__ import annotations

from typing import Any

import torch

from .common import build_tiny
from .qwen import SPECIAL_TOKENS, real_processor
from .tokenizer import byte_tokenizer

FAMILIES = ("qwen3_vl", "qwen3_vl_moe")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    return byte_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_processor(family: str = "qwen3_vl", min_pixels: int = 4 * 32 * 32, max_pixels: int = 256 * 32 * 32):
    """transformers' ``Qwen3VLProcessor`` around ``Qwen2VLImageProcessorPil`` (16-px patches, 0.5 mean / std)
    and the byte tokenizer (see :func:`ivcp.testing.qwen.real_processor`)."""
    from transformers import Qwen2VLImageProcessorPil

    kwargs = dict(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16, temporal_patch_size=2,
                  merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return real_processor("Qwen3VLProcessor", Qwen2VLImageProcessorPil(**kwargs), tiny_tokenizer(), CHAT_TEMPLATE,
                          "Qwen3VLVideoProcessor", kwargs)


def tiny_config(family: str = "qwen3_vl", **overrides: Any):
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    if family == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    text.update(overrides)
    attn = text.pop("attn_implementation", "sdpa")
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1, 2])
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig as Config
    else:
        from transformers import Qwen3VLConfig as Config
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn
    return config


def tiny_model(family: str = "qwen3_vl", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model
    config = tiny_config(family, **overrides)
    model = build_tiny(Model, config, seed, dtype)
    return model, tiny_processor(family)
