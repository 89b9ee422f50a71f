"""LLaVA-1.5 (transformers' ``LlavaForConditionalGeneration``, e.g. llava-hf/llava-1.5-7b-hf).

Layout: ``model.model`` is the multimodal model (CLIP ``vision_tower``, ``multi_modal_projector``,
``language_model``); decoder layers at ``model.model.language_model.layers`` (Llama: ``self_attn`` with
q/k/v/o projections, ``input_layernorm``). Each image is one run of (image_size / patch)² tokens of
``image_token_id`` (576 = 24 × 24 for ViT-L/14-336, the CLS token dropped by the "default" feature
strategy), in the raster order of the patch grid, with no start or end markers. Rotary: 1-D RoPE;
the decoder layers receive (cos, sin).

Image span: ``model.config.ivcp_image_span`` = ``"auto"`` (default: each image where its tokens are) or
``"authors_fixed"``: what the IVC-Prune authors' LLaVA runs did (their Tab. 2 / 16 LLaVA rows). Their config
hard-codes the image at input index 5 with 576 tokens while their prompt puts it near index 35, so the
"image" they pruned is tokens 5 .. 5 + side² − 1 (system-prompt tokens droppable, the image's last tokens
always kept) and their text queries, from two tokens after that span, include image tokens. With
``authors_fixed`` the one segment is that span (the prompt's first image only, as their code) and image
tokens outside it count as text.
"""

from __future__ import annotations

import torch

from .base import GlobalAttentionTower, ModelAdapter, Segment, mean_received, register_adapter


IMAGE_SPANS = ("auto", "authors_fixed")
AUTHORS_IMAGE_START = 5  # the authors' LLaVA config: image_start_index


@register_adapter
class LlavaAdapter(GlobalAttentionTower, ModelAdapter):
    family = "llava"
    model_types = ("llava",)

    @property
    def image_span(self) -> str:
        span = getattr(self.model.config, "ivcp_image_span", "auto")
        if span not in IMAGE_SPANS:
            raise ValueError(f"model.config.ivcp_image_span must be one of {', '.join(map(repr, IMAGE_SPANS))}, "
                             f"got {span!r}")
        return span

    # --- the image grid ---------------------------------------------------------------------------
    @property
    def grid_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _check_strategy(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"ivcp supports LLaVA's 'default' vision feature strategy (the patch grid, CLS dropped), "
                             f"not {strategy!r}: with the CLS token an image's tokens do not form a grid")

    def split_visual_inputs(self, input_ids: torch.Tensor, image_grid_thw, video_grid_thw, image_sizes) -> list[tuple]:
        """Every image has the tower's fixed grid: nothing to split (image sizes are not used)."""
        return [(None, None, None)] * input_ids.shape[0]

    def segments(self, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                 position_ids: torch.Tensor | None = None, image_sizes=None) -> list[Segment]:
        positions = (input_ids == self.model.config.image_token_id).nonzero().flatten()
        if not positions.numel():
            return []
        self._check_strategy()
        side = self.grid_side
        per_image = side * side
        if self.image_span == "authors_fixed":
            end = AUTHORS_IMAGE_START + per_image
            if end > input_ids.shape[-1]:
                raise ValueError(f"the authors' fixed image span {AUTHORS_IMAGE_START}:{end} does not fit a prompt of "
                                 f"{input_ids.shape[-1]} tokens")
            return [Segment(AUTHORS_IMAGE_START, end, side, side, "image", 0, 0)]
        segments: list[Segment] = []
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
        for run in torch.tensor_split(positions, breaks.tolist()):
            if run.numel() % per_image:
                raise ValueError(f"a run of {run.numel()} image tokens at {int(run[0])} is not a whole number of "
                                 f"{side} x {side} images; pass the processor's input_ids")
            for first in range(int(run[0]), int(run[-1]) + 1, per_image):  # adjacent images share one run
                segments.append(Segment(first, first + per_image, side, side, "image", len(segments), 0))
        return segments

    @property
    def marker_token_ids(self) -> frozenset[int]:
        # authors_fixed: image tokens outside the fixed span are text to the method (the authors' queries)
        return frozenset() if self.image_span == "authors_fixed" else frozenset({self.model.config.image_token_id})

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset({self.model.config.image_token_id})

    def synthetic_inputs(self, image_size: tuple[int, int], text_before: torch.Tensor, text_after: torch.Tensor,
                         generator: torch.Generator) -> dict:
        """One image at the tower's fixed size (LLaVA resizes every image to it: ``image_size`` is ignored)."""
        self._check_strategy()
        side = self.model.config.vision_config.image_size
        input_ids = torch.cat([text_before, torch.full((self.grid_side ** 2,), self.model.config.image_token_id),
                               text_after])[None]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.randn(1, 3, side, side, generator=generator)}

    def vision_flops(self, inputs: dict) -> int:
        from ..analytic import vit_flops

        v = self.model.config.vision_config
        text_hidden = self._text_config.hidden_size
        images = int(inputs["pixel_values"].shape[0])
        tokens = self.grid_side ** 2
        projector = 2 * tokens * (v.hidden_size * text_hidden + text_hidden * text_hidden)
        return images * (vit_flops(tokens + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers) + projector)

    # --- the vision tower (CLIP: GlobalAttentionTower) ------------------------------------------------

    @property
    def vision_global_block(self) -> int:
        # the features come from hidden_states[vision_feature_layer] (-2: the output of the last block but one)
        layer = self.model.config.vision_feature_layer
        layer = max(layer) if isinstance(layer, (list, tuple)) else layer
        return (layer if layer >= 0 else self.vision_depth + 1 + layer) - 1

    @torch.no_grad()
    def received_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        """CLIP block attention received by each patch (mean over heads and all queries, CLS included
        as a query), one (side²,) tensor per image; the CLS token's own column is dropped."""
        args, kwargs = attention_call["args"], attention_call["kwargs"]
        attn = attention_call["module"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (images, 1 + side², D)
        out = []
        for image in hidden:
            q = attn.q_proj(image).view(image.shape[0], attn.num_heads, -1).transpose(0, 1)
            k = attn.k_proj(image).view(image.shape[0], attn.num_heads, -1).transpose(0, 1)
            out.append(mean_received(q, k, attn.scale)[1:])
        return out

    @torch.no_grad()
    def cls_attention(self, tower_call: dict, attention_call: dict) -> list[torch.Tensor]:
        """CLIP block attention of the CLS query (row 0) to every key, softmax over all 1 + side² keys, mean
        over heads, the CLS column dropped: one (side²,) tensor per image (VScan's ``clip_encoder.py``)."""
        args, kwargs = attention_call["args"], attention_call["kwargs"]
        attn = attention_call["module"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (images, 1 + side², D)
        out = []
        for image in hidden:
            q = attn.q_proj(image[:1]).view(1, attn.num_heads, -1).transpose(0, 1)  # (heads, 1, d)
            k = attn.k_proj(image).view(image.shape[0], attn.num_heads, -1).transpose(0, 1)
            row = (q.float() @ k.float().transpose(1, 2) * attn.scale).softmax(-1)  # (heads, 1, 1 + side²)
            out.append(row.mean(0)[0, 1:])
        return out
