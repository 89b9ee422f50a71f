"""Qwen3-VL served by vLLM with ivcp's pruning inside the LLM (the mechanics: :mod:`ivcp.vllm.pruned`).

What differs from Qwen2.5-VL: q / k norms in attention (handled by :func:`ivcp.vllm.pruned.qkv`),
interleaved M-RoPE (vLLM's rotary, given the original ids) and deepstack — the vision tower's output
carries ``L`` more feature levels per token, which vLLM adds to the visual rows after decoder layers
0 … L−1 (``deepstack_input_embeds``). The side path adds them to the whole prompt in layers < K; in
layers ≥ K the kept tokens get theirs, as in ivcp's HF engine (pruned tokens take theirs with them).
"""

from __future__ import annotations

import torch

from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .pruned import PrunedPrefillMixin, PrunedProcessorMixin


class IvcpQwen3VLProcessor(PrunedProcessorMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor with each image's placeholder count cut to what its method keeps."""


@MULTIMODAL_REGISTRY.register_processor(IvcpQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class IvcpQwen3VLForConditionalGeneration(PrunedPrefillMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL (dense) with ivcp's pruning inside the LLM; a request without a method runs as vLLM's model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ivcp_init(vllm_config)

    def _visual_width(self) -> int:
        return self.visual_dim

    def _full_additions(self, embeds, extras):
        if not self.use_deepstack:
            return None
        levels, width = self.deepstack_num_level, self.visual_dim
        parts = []
        for emb, extra in zip(embeds, extras):
            if extra is None:
                parts.append(emb.new_zeros(levels, emb.shape[0], width))
            else:
                parts.append(extra.to(emb.dtype).view(-1, levels, width).transpose(0, 1))
        return list(torch.cat(parts, dim=1))

    def _batch_additions(self, n_tokens: int):
        found = self._get_deepstack_input_embeds(n_tokens)
        if found is None:
            return None
        return [found[f"deepstack_input_embeds_{level}"] for level in range(self.deepstack_num_level)]

    def _done_additions(self, n_tokens: int) -> None:
        self._clear_deepstack_input_embeds(n_tokens)
