"""Tiny InternVL models (random): InternViT tower, pixel-shuffle projector, and a Qwen2 decoder
(``internvl``, as InternVL3) or a Llama decoder (``internvl_llama``, as a converted InternVL2.5-8B).

Tiles of 64 px with 8-px patches: 8 × 8 patches, pixel shuffle → 4 × 4 = 16 tokens per tile (the real
model: 448 px, 14-px patches, 256 tokens); up to 6 tiles + a thumbnail, InternVL's dynamic tiling.
The processor is ivcp's ``InternVLTilesProcessor`` (a ``ProcessorMixin``: transformers' ``InternVLProcessor``
needs torchvision for its video half) around transformers' ``GotOcr2ImageProcessorPil``; it also returns the
images' ``image_sizes`` so the tiles' layout is known.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.internvl_processor import chat_template
from .common import build_tiny
from .tokenizer import byte_tokenizer

FAMILIES = ("internvl", "internvl_llama")
TILE, PATCH, MAX_TILES = 64, 8, 6
# <img>, </img>, <IMG_CONTEXT> in this order (consecutive ids, as in InternVL's tokenizers)
SPECIAL_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>")
CHAT_TEMPLATE = chat_template()  # InternVL's layout, no default system turn


def tiny_tokenizer():
    return byte_tokenizer(SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_processor(family: str = "internvl", max_tiles: int = MAX_TILES):
    """:class:`ivcp.models.internvl_processor.InternVLTilesProcessor` (a ``ProcessorMixin``) around
    ``GotOcr2ImageProcessorPil`` (64-px tiles, 1..``max_tiles`` + a thumbnail, ImageNet mean / std, bicubic) and
    the byte tokenizer: 16 ``<IMG_CONTEXT>`` per tile."""
    from transformers import GotOcr2ImageProcessorPil

    from ..models.internvl_processor import InternVLTilesProcessor

    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles,
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return InternVLTilesProcessor(image_processor, tiny_tokenizer(), image_seq_length=(TILE // PATCH) ** 2 // 4,
                                  chat_template=CHAT_TEMPLATE)


def tiny_config(family: str = "internvl", **overrides: Any):
    from transformers import InternVLConfig

    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(model_type="llama" if family == "internvl_llama" else "qwen2", hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                max_position_embeddings=4096, rms_norm_eps=1e-6, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    text.update(overrides)
    attn = text.pop("attn_implementation", "sdpa")
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH, use_mean_pooling=True, layer_scale_init_value=0.1),
        text_config=text, image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=(TILE // PATCH) ** 2 // 4,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn
    return config


def tiny_model(family: str = "internvl", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    from transformers import InternVLForConditionalGeneration

    config = tiny_config(family, **overrides)
    model = build_tiny(InternVLForConditionalGeneration, config, seed, dtype)
    return model, tiny_processor(family)
