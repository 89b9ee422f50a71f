"""Qwen3-VL, dense and MoE (transformers' ``Qwen3VLForConditionalGeneration`` /
``Qwen3VLMoeForConditionalGeneration``).

Same layout, markers and segment rules as Qwen2.5-VL (``qwen2_5_vl.py``); what differs:
- attention normalises q and k per head (``q_norm`` / ``k_norm``, RMSNorm over head_dim) before the
  rotary: recomputed queries and keys apply them too (:meth:`project_heads`);
- interleaved M-RoPE: frequency k rotates with h if k % 3 = 1 and k < 3·s_h, with w if k % 3 = 2 and
  k < 3·s_w, else with t (``mrope_section`` = (s_t, s_h, s_w)); the (cos, sin) the layers receive are
  already recomposed; head_dim is explicit in the config;
- deepstack: the features of a few vision blocks are added to the visual tokens after decoder layers
  0, 1, 2, …; the decoder gets them as ``visual_pos_masks`` + ``deepstack_visual_embeds``, which the
  adapter hands to the engine (:meth:`take_layer_additions`) so pruned tokens take theirs with them;
- vision: 16-px patches, 2 × 2 merge (32 px per token), full attention in every block (no windows:
  the tower keeps the raster order). VScan's "local" block here is the first deepstack block (the
  earliest block whose features reach the LLM directly: 8 of 27 in the 8B), its "global" block the last.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import RopeSpec, register_adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    @property
    def rope(self) -> RopeSpec:
        params = self._text_config.rope_parameters
        section = params.get("mrope_section") or [24, 20, 20]
        return RopeSpec(theta=float(params["rope_theta"]), head_dim=self.head_dim, mrope_section=tuple(section),
                        interleaved=True)

    def project_heads(self, attention: nn.Module, which: str, hidden: torch.Tensor) -> torch.Tensor:
        proj = getattr(attention, f"{which}_proj")(hidden)
        out = proj.view(hidden.shape[0], hidden.shape[1], -1, self.head_dim)
        if which in ("q", "k"):
            out = getattr(attention, f"{which}_norm")(out)
        return out.transpose(1, 2)

    def take_layer_additions(self, text_model_kwargs: dict, num_layers: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        mask = text_model_kwargs.pop("visual_pos_masks", None)
        features = text_model_kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or features is None:
            return {}
        if len(features) >= num_layers:
            raise ValueError(f"{len(features)} deepstack levels need more than {num_layers} decoder layers")
        tokens = mask.nonzero()  # (T, 2) [row, index], row-major: the order the decoder adds the features in
        # level i is added to layer i's output, i.e. to layer i + 1's input
        return {level + 1: (tokens, values) for level, values in enumerate(features)}

    # --- vision tower: no windows ------------------------------------------------------------------
    @property
    def vision_local_block(self) -> int:
        return int(self.model.config.vision_config.deepstack_visual_indexes[0])

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        total = sum(int(t * h * w) for t, h, w in grid_thw.tolist()) // self._merge ** 2
        return torch.arange(total)

    def vision_flops(self, inputs: dict) -> int:
        from ..analytic import VisionArch, vision_flops

        return vision_flops(VisionArch.from_config(self.model.config), [tuple(g) for g in inputs["image_grid_thw"].tolist()])
