"""What the engine needs to know about a model family, and the registry of adapters.

An adapter knows one family: where its decoder layers, attention projections and norms are, how
its input ids mark images and video frames, and its rotary parameters. The engine never looks at
a model except through an adapter; a method never looks at a model at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class RopeSpec:
    """Rotary parameters: θ_k = theta^(−2k/d), k = 0..d/2−1; ``mrope_section`` splits the d/2
    frequencies between the t/h/w position streams (None for 1-D RoPE): in contiguous blocks
    (``interleaved=False``: Qwen2-VL, Qwen2.5-VL) or interleaved t, h, w, t, h, w, … with the rest to t
    (``interleaved=True``: Qwen3-VL)."""

    theta: float
    head_dim: int
    mrope_section: tuple[int, ...] | None = None
    interleaved: bool = False

    def inv_freq(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        k = torch.arange(0, self.head_dim, 2, dtype=dtype)
        return 1.0 / (self.theta ** (k / self.head_dim))

    def frequency_streams(self) -> torch.Tensor:
        """(d/2,) the position stream (0 = t, 1 = h, 2 = w) each frequency k rotates with."""
        half = self.head_dim // 2
        if self.mrope_section is None:
            raise ValueError("1-D RoPE has a single position stream")
        if sum(self.mrope_section) != half:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover head_dim/2 = {half}")
        if not self.interleaved:
            return torch.cat([torch.full((n,), i % 3) for i, n in enumerate(self.mrope_section)])
        k = torch.arange(half)
        streams = torch.zeros(half, dtype=torch.long)
        streams[(k % 3 == 1) & (k < 3 * self.mrope_section[1])] = 1
        streams[(k % 3 == 2) & (k < 3 * self.mrope_section[2])] = 2
        return streams


@dataclass(frozen=True)
class Segment:
    """One visual segment: the half-open span ``[start, end)`` of its tokens in the input sequence and
    its merged grid (``grid_h`` × ``grid_w`` tokens, row-major). A segment is an image, one frame of a
    video, or one tile of an image cut into tiles (InternVL: ``part`` of ``parts``, the thumbnail last);
    the segments of one image or frame form a *unit* (same kind, source and frame) that methods give
    one budget. ``layout`` = (rows, cols) of a tiled image's tiles when known.

    ``row_stride``: the input-sequence distance between the first tokens of consecutive grid rows, when
    other tokens lie between the rows (DeepSeek-VL2: a newline column after each row, and in the local
    mosaic the other tiles of the same tile row); None (every other family) = ``grid_w``, one contiguous
    run. A strided segment's ``end`` is one past its last token; :meth:`indices` and :meth:`at` give its
    tokens' input indices. ``padding_cells``: local indices of cells that show only padding (DeepSeek-VL2's
    letterboxed global view), when known."""

    start: int
    end: int
    grid_h: int
    grid_w: int
    kind: str = "image"  # "image" or "video"
    source: int = 0  # index of the image, or of the video, in the prompt
    frame: int = 0  # temporal index inside a video (0 for images)
    part: int = 0  # index of this segment among its unit's (a tile; the thumbnail is the last)
    parts: int = 1
    thumbnail: bool = False
    layout: tuple[int, int] | None = None
    row_stride: int | None = None
    padding_cells: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.row_stride is not None and (self.row_stride < self.grid_w or self.end != self.start + (
                self.grid_h - 1) * self.row_stride + self.grid_w):
            raise ValueError(f"segment {self.start}:{self.end} of {self.grid_h} x {self.grid_w} tokens does not fit "
                             f"row_stride {self.row_stride}")

    @property
    def stride(self) -> int:
        """Input indices from one grid row's first token to the next's."""
        return self.grid_w if self.row_stride is None else self.row_stride

    @property
    def n(self) -> int:
        return self.end - self.start if self.row_stride is None else self.grid_h * self.grid_w

    @property
    def unit(self) -> tuple[str, int, int]:
        """The image or frame this segment belongs to."""
        return (self.kind, self.source, self.frame)

    def indices(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Input indices of the segment's tokens, row-major on its grid (ascending)."""
        if self.row_stride is None:
            return torch.arange(self.start, self.end, device=device)
        return self.at(torch.arange(self.n, device=device))

    def at(self, local):
        """Input indices of local indices (0..n−1, row-major on the grid): an int or a tensor."""
        if self.row_stride is None:
            return self.start + local
        return self.start + (local // self.grid_w) * self.row_stride + local % self.grid_w


class ModelAdapter:
    """Base class: subclass per model family and register with :func:`register_adapter`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module):
        self.model = model

    # --- where things are ---------------------------------------------------------------------
    # The defaults follow the layout transformers' vision-language models share: ``model.model`` (the
    # multimodal model) holds ``language_model`` (the decoder stack) with ``layers``, each with
    # ``self_attn`` (q/k/v/o projections) and ``input_layernorm``; the text settings in
    # ``config.text_config``. A family overrides what differs.
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives input_ids, the vision inputs and the past cache."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The decoder stack; its forward receives the position ids."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a decoder layer (with q_proj, k_proj, v_proj)."""
        return layer.self_attn

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    # --- shapes and rotary ------------------------------------------------------------------
    @property
    def _text_config(self):
        return getattr(self.model.config, "text_config", self.model.config)

    @property
    def attn_implementation(self) -> str | None:
        """The decoder's attention implementation ("sdpa", "eager", "flash_attention_2", …)."""
        return getattr(self._text_config, "_attn_implementation", None)

    @property
    def num_heads(self) -> int:
        return self._text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self._text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        cfg = self._text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def rope(self) -> RopeSpec:
        """1-D RoPE from the text config (M-RoPE families override)."""
        params = getattr(self._text_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", getattr(self._text_config, "rope_theta", 10000.0))
        return RopeSpec(theta=float(theta), head_dim=self.head_dim)

    @property
    def position_rows(self) -> int:
        """Rows of rotary position ids: 3 for M-RoPE (t, h, w), 1 for 1-D RoPE."""
        return 1 if self.rope.mrope_section is None else 3

    def attention_scale(self, layer: nn.Module) -> float:
        return float(getattr(self.attention(layer), "scaling", self.head_dim ** -0.5))

    def project_heads(self, attention: nn.Module, which: str, hidden: torch.Tensor) -> torch.Tensor:
        """The attention's ``which`` ∈ {q, k, v} projection of ``hidden`` (B, T, hidden) per head, before
        rotary, as the model computes it: (B, heads, T, head_dim). Families that normalise q / k per
        head (Qwen3-VL) override this."""
        proj = getattr(attention, f"{which}_proj")(hidden)
        return proj.view(hidden.shape[0], hidden.shape[1], -1, self.head_dim).transpose(1, 2)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the rotary embedding the decoder uses: x·cos + rotate_half(x)·sin.
        ``x`` is (B, heads, T, d); ``cos``/``sin`` are (B, T, d)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)

    def _lacks(self, feature: str) -> NotImplementedError:
        """The error for a feature this family's adapter does not provide (methods that need it
        cannot run on the family until its adapter adds it)."""
        return NotImplementedError(f"{type(self).__name__} has no {feature}; the method needs it")

    def split_position_embeddings(self, position_embeddings) -> tuple[torch.Tensor, ...]:
        """The decoder layers' ``position_embeddings`` as batch-first (B, T, …) tensors the engine can slice by
        token, (cos, sin) — what :meth:`rotate` takes; :meth:`join_position_embeddings` is the inverse. Families
        whose layers take another form (DeepseekV2: one complex tensor) override both."""
        return tuple(position_embeddings)

    def join_position_embeddings(self, parts: tuple[torch.Tensor, ...]):
        """The layers' ``position_embeddings`` from :meth:`split_position_embeddings`' parts."""
        return tuple(parts)

    @property
    def cache_holds_heads(self) -> bool:
        """Whether the KV cache holds each layer's per-head keys (rotary applied) and values, so the engine may
        read them there; False for caches of compressed latents (multi-head latent attention), whose keys and
        values the engine then recomputes with :meth:`project_heads`."""
        return True

    def layout_inputs(self, model_kwargs: dict):
        """What the model's inputs say about each image's layout, handed to :meth:`segments` as
        ``image_sizes``: the ``image_sizes`` input by default."""
        return model_kwargs.get("image_sizes")

    def rotary_embedding(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) the decoder would use for ``position_ids`` (rows, B, T): its rotary module, fed
        the 2-D ids of 1-D RoPE or the rows of M-RoPE."""
        return self.text_model.rotary_emb(hidden, position_ids[0] if self.position_rows == 1 else position_ids)

    # --- the vision tower (for methods that act before the LLM) -----------------------------
    @property
    def vision_tower(self) -> nn.Module:
        raise self._lacks("vision-tower access")

    def vision_attention_module(self, block: int) -> nn.Module:
        raise self._lacks("vision-tower access")

    @property
    def vision_depth(self) -> int:
        raise self._lacks("vision-tower access")

    @property
    def vision_local_block(self) -> int:
        """A vision block of local (early) attention, for methods that contrast local and global."""
        raise self._lacks("vision-tower access")

    def received_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        """Attention each visual token receives in one vision block (mean over heads and queries,
        pooled over each merge group), one (h·w,) tensor per frame in the LLM's raster order.
        ``tower_call`` / ``attention_call`` hold the captured ``args`` and ``kwargs`` of the vision
        tower's forward and of that block's attention module (``attention_call["module"]``)."""
        raise self._lacks("vision-tower access")

    def cls_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        """The CLS token's attention row in one vision block (mean over heads; softmax over all keys, the
        CLS column then dropped), one (h·w,) tensor per image; for towers with a CLS token (VScan's LLaVA
        scoring). Arguments as for :meth:`received_attention`."""
        raise self._lacks("CLS token in its vision tower")

    @property
    def vision_global_block(self) -> int:
        """The last vision block whose output reaches the LLM (VScan's global block)."""
        return self.vision_depth - 1

    def take_layer_additions(self, text_model_kwargs: dict, num_layers: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Features the decoder stack itself would add to visual tokens between layers (Qwen3-VL's
        deepstack), removed from its forward kwargs so the engine adds them to the tokens still present:
        layer index → ((T, 2) [batch row, input index] in row-major order, (T, hidden) features added to
        that layer's input). Most families add nothing: {}."""
        return {}

    # --- synthetic inputs and vision cost (the benchmark) -------------------------------------
    def synthetic_inputs(self, image_size: tuple[int, int], text_before: torch.Tensor, text_after: torch.Tensor,
                         generator: torch.Generator) -> dict:
        """Model inputs for one image of about ``image_size`` (H, W) pixels between two runs of text ids,
        built from the config alone (no tokenizer or processor; random pixels), on the CPU."""
        raise self._lacks("synthetic inputs for the benchmark")

    def vision_flops(self, inputs: dict) -> int:
        """FLOPs of the vision tower (and projector) for ``inputs`` (see ivcp/analytic.py)."""
        raise self._lacks("a vision FLOP count")

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids synthetic text must avoid (vision markup and other special tokens)."""
        return self.marker_token_ids

    # --- the prompt -------------------------------------------------------------------------
    def batch_segments(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       video_grid_thw: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                       image_sizes=None) -> list[list[Segment]]:
        """Visual segments of every row of ``input_ids`` (B, S): :meth:`segments` of each row with its own
        images' grids and sizes (the inputs list the whole batch's, row by row: :meth:`split_visual_inputs`);
        ``position_ids`` are (rows, B, S)."""
        per_row = self.split_visual_inputs(input_ids, image_grid_thw, video_grid_thw, image_sizes)
        return [self.segments(input_ids[b], images, videos, None if position_ids is None else position_ids[:, b],
                              image_sizes=sizes) for b, (images, videos, sizes) in enumerate(per_row)]

    def split_visual_inputs(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes) -> list[tuple]:
        """Per row of ``input_ids``, the (image grids, video grids, image sizes) of its own images. One row
        takes them all; families whose inputs describe images row by row override this to split them."""
        if input_ids.shape[0] == 1:
            return [(image_grid_thw, video_grid_thw, image_sizes)]
        if image_grid_thw is None and video_grid_thw is None and image_sizes is None:
            return [(None, None, None)] * input_ids.shape[0]
        raise self._lacks("way to tell which batch row each image grid or size belongs to (split_visual_inputs)")

    def segments(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                 video_grid_thw: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                 image_sizes=None) -> list[Segment]:
        """Visual segments of one row of ``input_ids`` (S,), in sequence order. ``position_ids``
        (rows, S) are the rotary ids, for when the grids are not at hand; ``image_sizes`` the images'
        (height, width) when the caller passed them (tiled families need them for the tiles' layout)."""
        raise NotImplementedError

    @property
    def marker_token_ids(self) -> frozenset[int]:
        """Tokens that belong to the vision markup (start/end markers, pads): never text queries."""
        raise NotImplementedError

    @property
    def turn_end_token_ids(self) -> frozenset[int]:
        """Tokens that close a chat turn (to skip the system prompt when text before an image is used):
        the end-of-sequence tokens of chat checkpoints."""
        eos = getattr(self.model.config, "eos_token_id", None) or getattr(self._text_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return frozenset(eos)


class GlobalAttentionTower:
    """Mixin for a ``model.model.vision_tower`` whose blocks all attend globally (CLIP, SigLIP, InternViT):
    its blocks and their attention modules, and, for methods that contrast a local and a global block
    (VScan), the block at the depth fraction of Qwen2.5-VL's first full-attention block (7 of 32).
    Towers laid out otherwise override :meth:`_vision_blocks` / :meth:`_block_attention`."""

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def _vision_blocks(self) -> nn.ModuleList:
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def _block_attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def vision_attention_module(self, block: int) -> nn.Module:
        return self._block_attention(self._vision_blocks()[block])

    @property
    def vision_depth(self) -> int:
        return len(self._vision_blocks())

    @property
    def vision_local_block(self) -> int:
        return int(7 * self.vision_depth / 32)


def mean_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each key receives, averaged over heads and queries: q, k (heads, n, d) → (n,).
    One head at a time, so at most n × n floats live at once."""
    total = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
    for head in range(q.shape[0]):
        total += (q[head].float() @ k[head].float().T * scale).softmax(-1).mean(0)
    return total / q.shape[0]


_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` the adapter for its ``model_types``."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def available_adapters() -> list[str]:
    return sorted({cls.family for cls in _ADAPTERS.values()})


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``model`` (matched on ``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise ValueError(
            f"unsupported model: {type(model).__name__} (model_type={model_type!r}); ivcp has adapters for "
            f"{', '.join(sorted(_ADAPTERS))}. Add one in ivcp/adapters/ (see README, 'Adding a model family')."
        )
    return cls(model)
