"""The analytic limit of pruning: FLOPs, KV bytes and bytes moved, for the tokens each layer sees.

Counts are multiply-adds × 2 of the matrix products (norms, activations, softmax and rotary are left
out: they are small and do not change with the method in a way that matters here).

LLM layer with n tokens in prefill (causal), hidden h, intermediate I (mixture of experts: top-k ×
expert width, the experts a token runs), H heads, KV heads of size d:
    projections 2·n·(h·H·d + 2·h·KV·d + H·d·h) + MLP 2·n·3·h·I + attention 4·H·d·n(n+1)/2
The LM head runs on the last token only (2·h·V). Decoding one token at a layer whose cache holds c
entries (the new one included): 2·(h·H·d + 2·h·KV·d + H·d·h + 3·h·I) + 4·H·d·c.
KV bytes: 2 · Σ_layers KV · d · bytes · tokens_layer. Decoding is bound by memory traffic, so its
ideal cost is the bytes read per token: all LLM weights + the whole KV cache.
Multi-head latent attention (DeepseekV2 / DeepSeek-VL2, as transformers runs it), latent rank r, query
rank q (0: a plain q_proj), per-head dims nope + rope for queries / keys and v for values: projections
per token 2·(h·H·(nope + rope) [q: h·q + q·H·(nope + rope)] + h·(r + rope) + H·v·h); the cache holds per
token and layer the normed latent (r) and the shared rotary key (rope), nothing per head: KV bytes
Σ_layers (r + rope) · bytes · tokens_layer; every forward expands the whole cache it attends through
kv_b_proj, 2·c·r·H·(nope + v) for c entries (prefill: once per token; decoding: the whole cache, every
step); attention 2·H·(nope + rope + v) per query-key pair.
Vision tower (Qwen2-VL / 2.5-VL) with P patches of width D: per block 2·P·4·D² (qkv + proj) + MLP
(2·P·3·D·I gated in 2.5-VL, 2·P·2·D·I in 2-VL) + attention 4·D·Σ s² over its attention spans (whole
frames in full-attention blocks, windows in the others); merger 2·(P/4)·(4D·4D + 4D·out) (Qwen3-VL: non-gated MLP, full attention in every block, one merger
more per deepstack level). A plain ViT (LLaVA's CLIP) with T tokens (CLS included) per image:
per layer 2·T·4·D² + 2·T·2·D·I + 4·D·T²; LLaVA's projector 2·(T−1)·(D·h + h·h).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextArch:
    """A decoder's shape. ``kv_lora_rank`` > 0: multi-head latent attention (``q_lora_rank``, ``qk_nope_dim``,
    ``qk_rope_dim``, ``v_head_dim`` then say its shapes and ``kv_heads`` / ``head_dim`` are unused)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0

    @classmethod
    def from_config(cls, config) -> "TextArch":
        """A mixture-of-experts decoder counts its active experts per token (top-k × expert width; the
        router is left out) — the FLOPs and the weights one token reads. A config with ``kv_lora_rank`` and
        multi-head latent attention (``use_mla``, default true: DeepSeek-VL2-Tiny has it false) counts MLA."""
        text = getattr(config, "text_config", config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        intermediate = text.intermediate_size
        if getattr(text, "num_experts", 0):
            intermediate = text.num_experts_per_tok * text.moe_intermediate_size
        mla = {}
        if getattr(text, "kv_lora_rank", None) and getattr(config, "use_mla", getattr(text, "use_mla", True)):
            mla = dict(kv_lora_rank=text.kv_lora_rank, q_lora_rank=text.q_lora_rank or 0,
                       qk_nope_dim=text.qk_nope_head_dim, qk_rope_dim=text.qk_rope_head_dim, v_head_dim=text.v_head_dim)
        return cls(text.hidden_size, intermediate, text.num_hidden_layers, text.num_attention_heads,
                   text.num_key_value_heads, head_dim, text.vocab_size, **mla)

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def linear_per_token(self) -> int:
        h, d, heads = self.hidden, self.head_dim, self.heads
        mlp = 3 * h * self.intermediate
        if not self.mla:
            return 2 * (h * heads * d + 2 * h * self.kv_heads * d + heads * d * h + mlp)
        qk = self.qk_nope_dim + self.qk_rope_dim
        q = h * heads * qk if not self.q_lora_rank else h * self.q_lora_rank + self.q_lora_rank * heads * qk
        return 2 * (q + h * (self.kv_lora_rank + self.qk_rope_dim) + heads * self.v_head_dim * h + mlp)

    @property
    def expansion_per_entry(self) -> int:
        """FLOPs of expanding one cached latent into per-head keys and values (kv_b_proj; 0 without MLA)."""
        return 2 * self.kv_lora_rank * self.heads * (self.qk_nope_dim + self.v_head_dim) if self.mla else 0

    @property
    def attention_per_pair(self) -> int:
        """FLOPs of one query-key pair: q·k and the value weighting, all heads."""
        if not self.mla:
            return 4 * self.heads * self.head_dim
        return 2 * self.heads * (self.qk_nope_dim + self.qk_rope_dim + self.v_head_dim)

    @property
    def cache_values_per_token(self) -> int:
        """Values one layer's cache holds per token: K and V of every KV head, or MLA's latent + rotary key."""
        return self.kv_lora_rank + self.qk_rope_dim if self.mla else 2 * self.kv_heads * self.head_dim

    @property
    def weight_count(self) -> int:
        """Parameters the decoder reads per token: layer matrices (with MLA's kv_b_proj) + LM head (embeddings
        are a lookup)."""
        return self.layers * (self.linear_per_token + self.expansion_per_entry) // 2 + self.hidden * self.vocab


def llm_prefill_flops(arch: TextArch, tokens_per_layer: list[int]) -> int:
    """Prefill FLOPs when layer l processes tokens_per_layer[l] tokens (causal), + the LM head once."""
    if len(tokens_per_layer) != arch.layers:
        raise ValueError(f"need one token count per layer ({arch.layers}), got {len(tokens_per_layer)}")
    total = 0
    for n in tokens_per_layer:
        total += n * (arch.linear_per_token + arch.expansion_per_entry) + arch.attention_per_pair * n * (n + 1) // 2
    return total + 2 * arch.hidden * arch.vocab


def llm_decode_flops(arch: TextArch, cache_per_layer: list[int]) -> int:
    """FLOPs of one decoding step; cache_per_layer counts the entries attended, the new one included (MLA:
    transformers expands every one of them again)."""
    return sum(arch.linear_per_token + (arch.attention_per_pair + arch.expansion_per_entry) * c
               for c in cache_per_layer) + 2 * arch.hidden * arch.vocab


def kv_bytes(arch: TextArch, tokens_per_layer: list[int], bytes_per_value: int) -> int:
    """Σ_l values cached per token · bytes · tokens_l: 2 (K and V) · KV heads · head_dim, or MLA's
    kv_lora_rank + qk_rope_head_dim."""
    return sum(arch.cache_values_per_token * bytes_per_value * n for n in tokens_per_layer)


def decode_bytes(arch: TextArch, cache_per_layer: list[int], bytes_per_value: int) -> int:
    """Bytes read per decoded token: every LLM weight once + every cached K and V."""
    return arch.weight_count * bytes_per_value + kv_bytes(arch, cache_per_layer, bytes_per_value)


@dataclass(frozen=True)
class VisionArch:
    depth: int
    dim: int
    intermediate: int
    gated: bool
    full_attention_blocks: tuple[int, ...]  # the others attend inside windows
    window_merged: int  # window side in merged tokens (0: no windows)
    merge: int
    out_dim: int
    mergers: int = 1  # patch mergers (Qwen3-VL: the main one + one per deepstack level)

    @classmethod
    def from_config(cls, config) -> "VisionArch":
        v = config.vision_config
        if hasattr(v, "deepstack_visual_indexes"):  # Qwen3-VL: full attention everywhere, plain MLP, deepstack mergers
            return cls(v.depth, v.hidden_size, v.intermediate_size, False, tuple(range(v.depth)), 0,
                       v.spatial_merge_size, v.out_hidden_size, 1 + len(v.deepstack_visual_indexes))
        if hasattr(v, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed blocks, gated MLP
            return cls(v.depth, v.hidden_size, v.intermediate_size, True, tuple(v.fullatt_block_indexes),
                       v.window_size // v.spatial_merge_size // v.patch_size, v.spatial_merge_size, v.out_hidden_size)
        return cls(v.depth, v.embed_dim, int(v.embed_dim * v.mlp_ratio), False, tuple(range(v.depth)), 0,
                   v.spatial_merge_size, v.hidden_size)


def window_spans(grid_h: int, grid_w: int, window_merged: int, merge: int) -> list[int]:
    """Patch counts of the attention windows of one frame (edge windows are smaller)."""
    gh, gw = grid_h // merge, grid_w // merge
    spans = []
    for r in range(0, gh, window_merged):
        for c in range(0, gw, window_merged):
            spans.append(min(window_merged, gh - r) * min(window_merged, gw - c) * merge * merge)
    return spans


def vision_flops(arch: VisionArch, grid_thw: list[tuple[int, int, int]]) -> int:
    """FLOPs of the vision tower for images / videos of patch grids (t, h, w)."""
    patches = sum(t * h * w for t, h, w in grid_thw)
    frames = [h * w for t, h, w in grid_thw for _ in range(t)]
    windows = [s for t, h, w in grid_thw for _ in range(t)
               for s in (window_spans(h, w, arch.window_merged, arch.merge) if arch.window_merged else [h * w])]
    d = arch.dim
    mlp = (3 if arch.gated else 2) * 2 * patches * d * arch.intermediate
    total = 0
    for block in range(arch.depth):
        spans = frames if block in arch.full_attention_blocks else windows
        total += 2 * patches * 4 * d * d + mlp + 4 * d * sum(s * s for s in spans)
    unit = arch.merge ** 2
    merged = patches // unit
    return total + arch.mergers * 2 * merged * (unit * d * unit * d + unit * d * arch.out_dim)


def vit_flops(tokens: int, dim: int, intermediate: int, depth: int) -> int:
    """FLOPs of a plain ViT over one image of ``tokens`` tokens (every block attends to all of them)."""
    return depth * (2 * tokens * 4 * dim * dim + 2 * tokens * 2 * dim * intermediate + 4 * dim * tokens * tokens)
