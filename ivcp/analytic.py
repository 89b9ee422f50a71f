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
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "TextArch":
        """A mixture-of-experts decoder counts its active experts per token (top-k × expert width; the
        router is left out) — the FLOPs and the weights one token reads."""
        text = getattr(config, "text_config", config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        intermediate = text.intermediate_size
        if getattr(text, "num_experts", 0):
            intermediate = text.num_experts_per_tok * text.moe_intermediate_size
        return cls(text.hidden_size, intermediate, text.num_hidden_layers, text.num_attention_heads,
                   text.num_key_value_heads, head_dim, text.vocab_size)

    @property
    def linear_per_token(self) -> int:
        h, d = self.hidden, self.head_dim
        return 2 * (h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h + 3 * h * self.intermediate)

    @property
    def weight_count(self) -> int:
        """Parameters the decoder reads per token: layer matrices + LM head (embeddings are a lookup)."""
        return self.layers * self.linear_per_token // 2 + self.hidden * self.vocab


def llm_prefill_flops(arch: TextArch, tokens_per_layer: list[int]) -> int:
    """Prefill FLOPs when layer l processes tokens_per_layer[l] tokens (causal), + the LM head once."""
    if len(tokens_per_layer) != arch.layers:
        raise ValueError(f"need one token count per layer ({arch.layers}), got {len(tokens_per_layer)}")
    total = 0
    for n in tokens_per_layer:
        total += n * arch.linear_per_token + 4 * arch.heads * arch.head_dim * n * (n + 1) // 2
    return total + 2 * arch.hidden * arch.vocab


def llm_decode_flops(arch: TextArch, cache_per_layer: list[int]) -> int:
    """FLOPs of one decoding step; cache_per_layer counts the entries attended, the new one included."""
    return sum(arch.linear_per_token + 4 * arch.heads * arch.head_dim * c for c in cache_per_layer) \
        + 2 * arch.hidden * arch.vocab


def kv_bytes(arch: TextArch, tokens_per_layer: list[int], bytes_per_value: int) -> int:
    """2 (K and V) · Σ_l KV heads · head_dim · bytes · tokens_l."""
    return sum(2 * arch.kv_heads * arch.head_dim * bytes_per_value * n for n in tokens_per_layer)


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
