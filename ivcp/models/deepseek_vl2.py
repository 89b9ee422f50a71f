"""DeepSeek-VL2 on current transformers: a native model assembled from transformers' SigLIP vision tower and
DeepseekV2 decoder (MLA + MoE) with a small projector, its config and a PIL-only processor.

The released checkpoints (deepseek-ai/deepseek-vl2-tiny / -small / deepseek-vl2) ship remote code for
transformers 4.38–4.51; ``scripts/convert_deepseek_vl2.py`` turns them into this layout. What the model does
(DeepSeek-VL2, arXiv 2412.10302, and the authors' released processor):

- Each image is a *global view* (the image padded to one square tile) and a mosaic of *local tiles*: the
  image padded to the candidate resolution (cols × rows tiles, cols · rows ≤ 9) that keeps the most of its
  pixels (then wastes the least), cut into tiles. With more than two images in a prompt there is no tiling
  (one local tile per image).
- Every tile goes through SigLIP (patch 14 at 384 px: 27 × 27 patches, final layer norm, no pooling head);
  the projector pads the patch grid to even sides, concatenates each 2 × 2 cell (channel-major, as
  ``F.unfold``) and applies Linear → GELU → Linear: 14 × 14 tokens per tile.
- Layout of one image's tokens (``tile_tag`` 2D, global view first): the global view's h rows, each followed
  by the learned ``image_newline``; the ``view_separator``; the local mosaic's rows·h rows of cols·w tokens,
  each followed by ``image_newline``. Every one of these positions holds the image token in the input ids:
  h·(w+1) + 1 + rows·h·(cols·w+1) tokens (14·15 + 1 + …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV2Config, DeepseekV2Model, GenerationMixin, PretrainedConfig, PreTrainedModel, \
    SiglipVisionConfig, SiglipVisionModel
from transformers.modeling_outputs import ModelOutput

from ..compat import CACHE_KWARG, output_cache

# The released checkpoints' candidate resolutions (width, height) in pixels for 384-px tiles, in their order
# (the order breaks ties): every cols × rows with cols · rows ≤ 9.
RELEASED_GRIDS = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1),
                  (2, 3), (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3))


def candidate_resolutions(tile_size: int, grids=RELEASED_GRIDS) -> list[list[int]]:
    """[width, height] in pixels of each (cols, rows) tile grid."""
    return [[cols * tile_size, rows * tile_size] for cols, rows in grids]


def select_resolution(width: int, height: int, resolutions) -> tuple[int, int]:
    """DeepSeek-VL2's choice of canvas for an image of ``width`` × ``height``: the candidate (width, height)
    whose aspect-preserving fit keeps the most image pixels (min(fit area, image area), the fit's sides
    truncated to integers); among equals the one wasting the least canvas; among those the first listed."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best, best_kept, best_waste = None, -1, math.inf
    for cand_w, cand_h in resolutions:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(cand_w), int(cand_h)), kept, waste
    return best


class DeepseekVL2Config(PretrainedConfig):
    """DeepSeek-VL2: a SigLIP ``vision_config``, a DeepseekV2 ``text_config`` and the projector / layout settings.

    ``image_token_id``: the id every image position holds in the input ids (the tokenizer's ``<image>``);
    ``downsample_ratio``: side of the projector's concatenated cell (2); ``projector_depth``: linear layers of the
    projector (2: Linear → GELU → Linear); ``candidate_resolutions``: [width, height] canvases of the local tiles;
    ``max_tiled_images``: prompts with more images get one local tile per image (2 in the released processor);
    ``use_mla``: False for DeepSeek-VL2-Tiny, whose decoder layers use plain multi-head attention
    (:class:`DeepseekVL2MultiHeadAttention`) instead of multi-head latent attention."""

    model_type = "deepseek_vl2"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": DeepseekV2Config}

    def __init__(self, vision_config=None, text_config=None, image_token_id: int | None = None,
                 downsample_ratio: int = 2, projector_depth: int = 2, candidate_resolutions=None,
                 max_tiled_images: int = 2, global_view_pos: str = "head", tile_tag: str = "2D",
                 use_mla: bool = True, tie_word_embeddings: bool = False, **kwargs):
        if isinstance(vision_config, dict) or vision_config is None:
            defaults = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14, vision_use_head=False)
            vision_config = SiglipVisionConfig(**{**defaults, **(vision_config or {})})
        if isinstance(text_config, dict) or text_config is None:
            text_config = DeepseekV2Config(**(text_config or {}))
        if global_view_pos != "head" or tile_tag != "2D":
            raise ValueError(f"only tile_tag='2D' with global_view_pos='head' (the released checkpoints) is "
                             f"supported, got {tile_tag!r} / {global_view_pos!r}")
        self.vision_config, self.text_config = vision_config, text_config
        self.image_token_id = image_token_id
        self.downsample_ratio, self.projector_depth = int(downsample_ratio), int(projector_depth)
        self.candidate_resolutions = [list(map(int, r)) for r in
                                      (candidate_resolutions or globals()["candidate_resolutions"](vision_config.image_size))]
        self.max_tiled_images = int(max_tiled_images)
        self.use_mla = bool(use_mla)
        if not self.use_mla and text_config.qk_rope_head_dim != text_config.hidden_size // text_config.num_attention_heads:
            raise ValueError("use_mla=False (multi-head attention) rotates whole heads: text_config.qk_rope_head_dim must "
                             f"equal hidden_size / num_attention_heads ({text_config.hidden_size // text_config.num_attention_heads})")
        self.global_view_pos, self.tile_tag = global_view_pos, tile_tag
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def tile_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def tokens_per_side(self) -> int:
        """h = w of one tile's token grid: ceil(patches per side / downsample ratio) (14 for 384 / 14)."""
        return math.ceil((self.vision_config.image_size // self.vision_config.patch_size) / self.downsample_ratio)

    def image_token_count(self, rows: int, cols: int) -> int:
        """Tokens of one image with ``rows`` × ``cols`` local tiles: h·(w+1) + 1 + rows·h·(cols·w+1)."""
        side = self.tokens_per_side
        return side * (side + 1) + 1 + rows * side * (cols * side + 1)


class DeepseekVL2Projector(nn.Module):
    """2 × 2 token concatenation (grid padded with zeros to even sides) then Linear → GELU → … → Linear."""

    def __init__(self, config: DeepseekVL2Config):
        super().__init__()
        self.ratio = config.downsample_ratio
        width, hidden = config.vision_config.hidden_size * self.ratio ** 2, config.text_config.hidden_size
        layers: list[nn.Module] = [nn.Linear(width, hidden)]
        for _ in range(1, config.projector_depth):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tiles, patches, dim = features.shape
        side = math.isqrt(patches)
        grid = features.view(tiles, side, side, dim)
        pad = (-side) % self.ratio
        if pad:
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        # (tiles, dim·r·r, cells): channel-major within each cell, cells row-major
        cells = F.unfold(grid.permute(0, 3, 1, 2), kernel_size=self.ratio, stride=self.ratio)
        return self.layers(cells.transpose(1, 2))


@dataclass
class DeepseekVL2CausalLMOutput(ModelOutput):
    """The KV cache under both names transformers has used (``cache`` from 5.24, ``past_key_values`` before)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


class DeepseekVL2MultiHeadAttention(nn.Module):
    """DeepSeek-VL2-Tiny's attention (its remote code: ``use_mla: false`` → Llama attention): q / k / v / o
    projections without bias, RoPE over the whole head (x·cos + rotate_half(x)·sin, θ from the config), softmax
    scale head_dim^-½. Takes the DeepseekV2 layers' arguments: ``position_embeddings`` is DeepseekV2's complex
    e^{i·p·θ_k} (k < head_dim / 2), and the cache holds per-head keys and values."""

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.attention_dropout = 0.0
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Llama's rotary on (B, heads, T, d) with (cos, sin) of the d/2 frequencies, (B, T, d/2)."""
        cos, sin = torch.cat([cos, cos], -1).unsqueeze(1), torch.cat([sin, sin], -1).unsqueeze(1)
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x.float() * cos + turned.float() * sin).to(x.dtype)

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import eager_attention_forward

        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        b, t = hidden_states.shape[:2]
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if isinstance(position_embeddings, (tuple, list)):  # a (cos, sin) pair, each frequency once or twice
            cos, sin = (part[..., : self.head_dim // 2] for part in position_embeddings)
        else:
            cos, sin = position_embeddings.real, position_embeddings.imag
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(b, t, -1).contiguous()), weights


class DeepseekVL2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekVL2Config
    config: DeepseekVL2Config
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["DeepseekV2DecoderLayer", "SiglipEncoderLayer"]
    _keep_in_fp32_modules_strict = ["gate.weight"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeepseekVL2Model):
            std = self.config.text_config.hidden_size ** -0.5
            for param in (module.image_newline, module.view_separator):
                with torch.no_grad():
                    param.normal_(0.0, std)


class DeepseekVL2Model(DeepseekVL2PreTrainedModel):
    """Vision tower + projector + the image layout (newlines, separator) + the DeepseekV2 decoder stack."""

    def __init__(self, config: DeepseekVL2Config):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.projector = DeepseekVL2Projector(config)
        hidden = config.text_config.hidden_size
        self.image_newline = nn.Parameter(torch.zeros(hidden))
        self.view_separator = nn.Parameter(torch.zeros(hidden))
        self.language_model = DeepseekV2Model(config.text_config)
        if not config.use_mla:  # DeepSeek-VL2-Tiny: multi-head attention in the DeepseekV2 layers
            for index, layer in enumerate(self.language_model.layers):
                layer.self_attn = DeepseekVL2MultiHeadAttention(config.text_config, index)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def tile_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) → (tiles, h·w, hidden): SigLIP's last hidden state (after its final layer norm)
        through the projector."""
        out = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype))
        return self.projector(out.last_hidden_state)

    def image_embeddings(self, pixel_values: torch.Tensor, image_tiles: torch.Tensor) -> torch.Tensor:
        """The embeddings of every image position, images in order: per image its global view (h rows +
        newline each), the separator, its local mosaic (rows·h rows of cols·w tokens + newline each).
        ``pixel_values`` (tiles, 3, S, S) lists per image its global view then its local tiles row-major;
        ``image_tiles`` (images, 2) holds each image's (rows, cols) of local tiles."""
        features = self.tile_features(pixel_values)
        side = self.config.tokens_per_side
        dim = features.shape[-1]
        newline = self.image_newline.to(features.dtype)
        pieces, cursor = [], 0
        for rows, cols in torch.as_tensor(image_tiles).tolist():
            n_local = rows * cols
            if cursor + 1 + n_local > features.shape[0]:
                raise ValueError(f"image_tiles asks for {cursor + 1 + n_local} tiles but pixel_values holds "
                                 f"{features.shape[0]}")
            global_view = features[cursor].view(side, side, dim)
            local = features[cursor + 1: cursor + 1 + n_local].view(rows, cols, side, side, dim)
            mosaic = local.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
            pieces += [torch.cat([global_view, newline.expand(side, 1, dim)], 1).reshape(-1, dim),
                       self.view_separator.to(features.dtype)[None],
                       torch.cat([mosaic, newline.expand(rows * side, 1, dim)], 1).reshape(-1, dim)]
            cursor += 1 + n_local
        if cursor != features.shape[0]:
            raise ValueError(f"pixel_values holds {features.shape[0]} tiles but image_tiles describes {cursor}")
        return torch.cat(pieces)

    def forward(self, input_ids=None, pixel_values=None, image_tiles=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, image_sizes=None, **kwargs):
        """``image_sizes`` (the originals' (height, width), from the processor) is not used here: it is part of the
        inputs so that pruning can find the global view's letterbox (``ivcp.adapters.deepseek_vl2``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None and input_ids is not None:
            is_image = input_ids == self.config.image_token_id
            if bool(is_image.any()):  # decode steps carry no image positions
                if image_tiles is None:
                    raise ValueError("pixel_values need image_tiles: each image's (rows, cols) of local tiles")
                embeds = self.image_embeddings(pixel_values, image_tiles).to(inputs_embeds.dtype)
                if embeds.shape[0] != int(is_image.sum()):
                    raise ValueError(f"the prompt has {int(is_image.sum())} image positions but the images give "
                                     f"{embeds.shape[0]} embeddings (check image_tiles against the processor's)")
                inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], embeds)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)


class DeepseekVL2ForConditionalGeneration(DeepseekVL2PreTrainedModel, GenerationMixin):
    """DeepSeek-VL2 with its language-model head; ``generate()`` with sdpa, eager or flash attention."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: DeepseekVL2Config):
        super().__init__(config)
        self.model = DeepseekVL2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, pixel_values=None, image_tiles=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, logits_to_keep: int | torch.Tensor = 0, image_sizes=None, **kwargs):
        """``image_sizes`` (the processor's record of the originals' sizes) is handed to the inner model unused."""
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, image_tiles=image_tiles,
                         attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                         image_sizes=image_sizes, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        cache = output_cache(out)
        return DeepseekVL2CausalLMOutput(loss=loss, logits=logits, **{CACHE_KWARG: cache},
                                         hidden_states=out.hidden_states, attentions=out.attentions)


# --- the released checkpoints (remote-code layout) --------------------------------------------------------------
REMOTE_UNSUPPORTED = {"topk_method": ("noaux_tc",), "scoring_func": ("sigmoid",)}
# What the released remote code (deepseek-ai/DeepSeek-VL2, deepseek_vl2/models/configuration_deepseek.py,
# DeepseekV2Config) assumes for a language_config key that the checkpoint's config.json leaves out, where
# transformers' DeepseekV2Config assumes something else or nothing: DeepSeek-VL2-Small's config.json gives no
# kv_lora_rank, qk_* / v_head_dim, bos / eos or rope_scaling (docs/deepseek_vl2.md).
REMOTE_DEFAULTS = {"kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                   "v_head_dim": 128, "vocab_size": 102400, "bos_token_id": 100000, "eos_token_id": 100001,
                   "max_position_embeddings": 2048, "first_k_dense_replace": 0, "norm_topk_prob": False,
                   "routed_scaling_factor": 1.0, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def config_from_remote(remote: dict, image_token_id: int) -> DeepseekVL2Config:
    """Our config from a released ``config.json`` (``vision_config`` with width / layers / heads / mlp_ratio,
    ``projector_config``, ``language_config``, ``tile_tag``, ``global_view_pos``, ``candidate_resolutions``).
    Settings transformers' DeepseekV2 does not implement are refused with the field that asks for them."""
    vision, projector, language = (dict(remote.get(k) or {}) for k in ("vision_config", "projector_config", "language_config"))
    language = {**REMOTE_DEFAULTS, **language}
    language.setdefault("num_key_value_heads", language.get("num_attention_heads"))  # the remote code's fallback
    width = int(vision.get("width", 1152))
    if projector.get("projector_type", "downsample_mlp_gelu") != "downsample_mlp_gelu" or projector.get("token_pooling"):
        raise ValueError(f"projector_type {projector.get('projector_type')!r}: only downsample_mlp_gelu is supported")
    if int(projector.get("mlp_ratio", 1)) != 1:
        raise ValueError(f"projector mlp_ratio {projector['mlp_ratio']}: only 1 (the released checkpoints) is supported")
    if int(projector.get("input_dim", width)) != width:
        raise ValueError(f"projector input_dim {projector['input_dim']} differs from the vision width {width}")
    for field, bad in REMOTE_UNSUPPORTED.items():
        if language.get(field) in bad:
            raise ValueError(f"language_config.{field} = {language[field]!r} is not implemented by transformers' "
                             f"DeepseekV2 (supported: DeepSeek-VL2-Tiny / -Small settings)")
    if language.get("norm_topk_prob") and int(language.get("num_experts_per_tok") or 1) > 1:
        raise ValueError("language_config.norm_topk_prob = true is not implemented by transformers' DeepseekV2")
    use_mla = bool(language.get("use_mla", True))
    text = {k: v for k, v in language.items() if k in DeepseekV2Config().to_dict() or k in (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace", "n_group",
        "topk_group", "topk_method", "routed_scaling_factor", "norm_topk_prob")}
    for drop in ("architectures", "model_type", "transformers_version", "rope_scaling", "rope_theta", "_name_or_path"):
        text.pop(drop, None)
    if language.get("rope_scaling"):
        raise ValueError(f"language_config.rope_scaling {language['rope_scaling']!r} is not supported")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(language.get("rope_theta", 10000.0))}
    if not use_mla:  # the rotary module then covers whole heads
        text["qk_rope_head_dim"] = int(language["hidden_size"]) // int(language["num_attention_heads"])
    if int(language.get("moe_layer_freq", 1)) != 1:
        raise ValueError(f"language_config.moe_layer_freq {language['moe_layer_freq']}: only 1 is supported")
    vision_config = dict(hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 3.7362))),
                         num_hidden_layers=int(vision.get("layers", 27)), num_attention_heads=int(vision.get("heads", 16)),
                         image_size=int(vision.get("image_size", 384)), patch_size=int(vision.get("patch_size", 14)),
                         vision_use_head=False, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    return DeepseekVL2Config(vision_config=vision_config, text_config=text, image_token_id=image_token_id,
                             downsample_ratio=int(projector.get("downsample_ratio", 2)),
                             projector_depth=int(projector.get("depth", 2)),
                             candidate_resolutions=remote.get("candidate_resolutions"),
                             tile_tag=remote.get("tile_tag", "2D"), global_view_pos=remote.get("global_view_pos", "head"),
                             use_mla=use_mla)


def _vision_prefix() -> str:
    """Where SiglipVisionModel keeps its layers in this transformers version ("" or "vision_model.")."""
    from transformers.models.siglip import modeling_siglip

    has_inner = "vision_model" in modeling_siglip.SiglipVisionModel.__init__.__code__.co_names
    return "vision_model." if has_inner else ""


def state_dict_from_remote(remote: dict[str, torch.Tensor], config: DeepseekVL2Config) -> dict[str, torch.Tensor]:
    """Our weights from the released checkpoint's (remote-code key layout): timm SigLIP (fused qkv, pos_embed)
    → transformers' SigLIP; the MoE experts' separate gate / up / down projections → the fused
    ``gate_up_proj`` / ``down_proj`` of transformers' DeepseekV2; the pooling head (``attn_pool``) dropped."""
    vision = "model.vision_tower." + _vision_prefix()
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in remote.items():
        if key.startswith("vision.attn_pool.") or key.startswith("vision.head."):
            continue
        if key.startswith("vision."):
            name = key[len("vision."):]
            if name == "pos_embed":
                out[vision + "embeddings.position_embedding.weight"] = value.reshape(-1, value.shape[-1])
            elif name.startswith("patch_embed.proj."):
                out[vision + "embeddings.patch_embedding." + name.split(".")[-1]] = value
            elif name.startswith("norm."):
                out[vision + "post_layernorm." + name.split(".")[-1]] = value
            elif name.startswith("blocks."):
                _, block, rest = name.split(".", 2)
                base = f"{vision}encoder.layers.{block}."
                if rest.startswith("attn.qkv."):
                    for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                        out[f"{base}self_attn.{part}_proj.{rest.split('.')[-1]}"] = chunk.contiguous()
                else:
                    rest = (rest.replace("norm1.", "layer_norm1.").replace("norm2.", "layer_norm2.")
                            .replace("attn.proj.", "self_attn.out_proj."))
                    out[base + rest] = value
            else:
                raise ValueError(f"unexpected vision weight {key}")
        elif key.startswith("projector.layers."):
            out["model." + key] = value
        elif key == "image_newline":
            out["model.image_newline"] = value
        elif key in ("view_seperator", "view_separator"):
            out["model.view_separator"] = value
        elif key == "language.lm_head.weight":
            out["lm_head.weight"] = value
        elif key.startswith("language.model."):
            name = key[len("language.model."):]
            parts = name.split(".")
            if len(parts) > 5 and parts[2] == "mlp" and parts[3] == "experts":
                experts.setdefault((int(parts[1]), parts[5]), {})[int(parts[4])] = value
                if parts[6] != "weight":
                    raise ValueError(f"unexpected expert weight {key}")
            elif name.endswith("e_score_correction_bias"):
                raise ValueError(f"{key}: noaux_tc routing is not implemented by transformers' DeepseekV2")
            else:
                out["model.language_model." + name] = value
        else:
            raise ValueError(f"unexpected weight {key} (not a DeepSeek-VL2 checkpoint in the remote-code layout?)")
    layers = sorted({layer for layer, _ in experts})
    for layer in layers:
        n = len(experts[(layer, "gate_proj")])
        gate, up, down = ([experts[(layer, which)][e] for e in range(n)] for which in ("gate_proj", "up_proj", "down_proj"))
        base = f"model.language_model.layers.{layer}.mlp.experts."
        out[base + "gate_up_proj"] = torch.stack([torch.cat([g, u], 0) for g, u in zip(gate, up)])
        out[base + "down_proj"] = torch.stack(down)
    return out


def _register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageTextToText`` know ``deepseek_vl2`` (for from_config / from_pretrained)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        AutoConfig.register(DeepseekVL2Config.model_type, DeepseekVL2Config)
        AutoModelForImageTextToText.register(DeepseekVL2Config, DeepseekVL2ForConditionalGeneration)
    except ValueError:  # already registered (a reload)
        pass


_register_auto_classes()
