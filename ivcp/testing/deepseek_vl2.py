"""Tiny DeepSeek-VL2 models (random): SigLIP tower, the 2 × 2 projector and a DeepseekV2 MoE decoder with
multi-head latent attention (``deepseek_vl2``, as DeepSeek-VL2-Small) or with multi-head attention
(``deepseek_vl2_mha``, as DeepSeek-VL2-Tiny: 4 heads of 16, 2 key / value heads).

Tiles of 35 px with 7-px patches: 5 × 5 patches, padded to 6 × 6 by the projector → 3 × 3 tokens per tile
(the real model: 384 px, 14-px patches, 27 → 28 → 14 × 14 tokens; the odd patch grid is kept on purpose).
One image = 3 · 4 global-view tokens (newline after each row) + the separator + rows · 3 · (cols · 3 + 1)
mosaic tokens. The candidate tile grids are the released ones (cols · rows ≤ 9).
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.deepseek_vl2 import DeepseekVL2Config, DeepseekVL2ForConditionalGeneration
from ..models.deepseek_vl2_processor import CHAT_TOKENS, GROUNDING_TOKENS, IMAGE_TOKEN, DeepseekVL2Processor
from .common import build_tiny
from .tokenizer import byte_tokenizer

FAMILIES = ("deepseek_vl2", "deepseek_vl2_mha")
TILE, PATCH = 35, 7
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIAL_TOKENS = (EOS, PAD, BOS, IMAGE_TOKEN) + GROUNDING_TOKENS + CHAT_TOKENS


def tiny_tokenizer():
    tokenizer = byte_tokenizer(SPECIAL_TOKENS, eos_token=EOS, pad_token=PAD, chat_template="")
    tokenizer.bos_token = BOS
    return tokenizer


def tiny_processor(family: str = "deepseek_vl2") -> DeepseekVL2Processor:
    """ivcp's ``DeepseekVL2Processor`` (a ``ProcessorMixin``, PIL tiling) of 35-px tiles and 7-px patches around the
    byte tokenizer."""
    return DeepseekVL2Processor.from_settings(tiny_tokenizer(), tile_size=TILE, patch_size=PATCH, downsample_ratio=2)


def tiny_config(family: str = "deepseek_vl2", **overrides: Any) -> DeepseekVL2Config:
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
                routed_scaling_factor=1.0, norm_topk_prob=False, vocab_size=len(tokenizer),
                max_position_embeddings=4096, rms_norm_eps=1e-6, eos_token_id=ids[EOS], pad_token_id=ids[PAD],
                bos_token_id=ids[BOS], rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    mha = family == "deepseek_vl2_mha"
    if mha:
        text.update(num_key_value_heads=2, qk_rope_head_dim=16)
    text.update(overrides)
    attn = text.pop("attn_implementation", "sdpa")
    config = DeepseekVL2Config(use_mla=not mha,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH, vision_use_head=False),
        text_config=text, image_token_id=ids[IMAGE_TOKEN], downsample_ratio=2, projector_depth=2)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn
    return config


def tiny_model(family: str = "deepseek_vl2", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    config = tiny_config(family, **overrides)
    model = build_tiny(DeepseekVL2ForConditionalGeneration, config, seed, dtype)
    return model, tiny_processor(family)


def remote_state_dict(config: DeepseekVL2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of ``config``'s architecture in the released checkpoints' remote-code key layout (timm
    SigLIP with fused qkv and ``pos_embed``, its unused ``attn_pool``, ``projector.layers.{0,2}``,
    ``image_newline`` / ``view_seperator``, ``language.model.*`` with one module per MoE expert,
    ``language.lm_head``): what ``scripts/convert_deepseek_vl2.py`` reads."""
    g = torch.Generator().manual_seed(seed)
    v, t = config.vision_config, config.text_config
    out: dict[str, torch.Tensor] = {}

    def linear(name, rows, cols, bias=True):
        out[name + ".weight"] = torch.randn(rows, cols, generator=g) / cols ** 0.5
        if bias:
            out[name + ".bias"] = 0.1 * torch.randn(rows, generator=g)

    def norm(name, dim, bias=True):
        out[name + ".weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        if bias:
            out[name + ".bias"] = 0.1 * torch.randn(dim, generator=g)

    c, patches = v.hidden_size, (v.image_size // v.patch_size) ** 2
    out["vision.patch_embed.proj.weight"] = torch.randn(c, 3, v.patch_size, v.patch_size, generator=g) / (3 * v.patch_size ** 2) ** 0.5
    out["vision.patch_embed.proj.bias"] = 0.1 * torch.randn(c, generator=g)
    out["vision.pos_embed"] = 0.5 * torch.randn(1, patches, c, generator=g)
    for i in range(v.num_hidden_layers):
        b = f"vision.blocks.{i}."
        norm(b + "norm1", c)
        linear(b + "attn.qkv", 3 * c, c)
        linear(b + "attn.proj", c, c)
        norm(b + "norm2", c)
        linear(b + "mlp.fc1", v.intermediate_size, c)
        linear(b + "mlp.fc2", c, v.intermediate_size)
    norm("vision.norm", c)
    out["vision.attn_pool.latent"] = torch.randn(1, 1, c, generator=g)  # the unused pooling head
    d = t.hidden_size
    linear("projector.layers.0", d, c * config.downsample_ratio ** 2)
    for j in range(1, config.projector_depth):
        linear(f"projector.layers.{2 * j}", d, d)
    out["image_newline"] = torch.randn(d, generator=g) / d ** 0.5
    out["view_seperator"] = torch.randn(d, generator=g) / d ** 0.5
    out["language.model.embed_tokens.weight"] = torch.randn(t.vocab_size, d, generator=g)
    h, qk = t.num_attention_heads, t.qk_nope_head_dim + t.qk_rope_head_dim
    for i in range(t.num_hidden_layers):
        b = f"language.model.layers.{i}."
        if not config.use_mla:
            hd, kv = d // h, t.num_key_value_heads
            for name, rows in (("q_proj", h * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                linear(b + "self_attn." + name, rows, d, bias=False)
            linear(b + "self_attn.o_proj", d, h * hd, bias=False)
        elif t.q_lora_rank is None:
            linear(b + "self_attn.q_proj", h * qk, d, bias=False)
        else:
            linear(b + "self_attn.q_a_proj", t.q_lora_rank, d, bias=False)
            norm(b + "self_attn.q_a_layernorm", t.q_lora_rank, bias=False)
            linear(b + "self_attn.q_b_proj", h * qk, t.q_lora_rank, bias=False)
        if config.use_mla:
            linear(b + "self_attn.kv_a_proj_with_mqa", t.kv_lora_rank + t.qk_rope_head_dim, d, bias=False)
            norm(b + "self_attn.kv_a_layernorm", t.kv_lora_rank, bias=False)
            linear(b + "self_attn.kv_b_proj", h * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank, bias=False)
            linear(b + "self_attn.o_proj", d, h * t.v_head_dim, bias=False)
        if i < t.first_k_dense_replace:
            for name, rows, cols in (("gate_proj", t.intermediate_size, d), ("up_proj", t.intermediate_size, d),
                                     ("down_proj", d, t.intermediate_size)):
                linear(b + "mlp." + name, rows, cols, bias=False)
        else:
            out[b + "mlp.gate.weight"] = torch.randn(t.n_routed_experts, d, generator=g)
            width = t.moe_intermediate_size
            for e in range(t.n_routed_experts):
                for name, rows, cols in (("gate_proj", width, d), ("up_proj", width, d), ("down_proj", d, width)):
                    linear(f"{b}mlp.experts.{e}.{name}", rows, cols, bias=False)
            shared = width * t.n_shared_experts
            for name, rows, cols in (("gate_proj", shared, d), ("up_proj", shared, d), ("down_proj", d, shared)):
                linear(f"{b}mlp.shared_experts.{name}", rows, cols, bias=False)
        norm(b + "input_layernorm", d, bias=False)
        norm(b + "post_attention_layernorm", d, bias=False)
    norm("language.model.norm", d, bias=False)
    linear("language.lm_head", t.vocab_size, d, bias=False)
    return out
