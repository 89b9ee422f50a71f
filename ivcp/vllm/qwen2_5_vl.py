"""Qwen2.5-VL and Qwen2-VL served by vLLM with ivcp's pruning inside the LLM (the mechanics:
:mod:`ivcp.vllm.pruned`). Both families' decoders are Qwen2's: only the vision towers differ."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,
                                                   Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .pruned import PrunedPrefillMixin, PrunedProcessorMixin, check_engine, full_grid_positions  # noqa: F401


class IvcpQwen2_5_VLProcessor(PrunedProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with each image's placeholder count cut to what its method keeps."""


@MULTIMODAL_REGISTRY.register_processor(IvcpQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class IvcpQwen2_5_VLForConditionalGeneration(PrunedPrefillMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with ivcp's pruning inside the LLM; a request without a method runs as vLLM's model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ivcp_init(vllm_config)


class IvcpQwen2VLProcessor(PrunedProcessorMixin, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor with each image's placeholder count cut to what its method keeps."""


@MULTIMODAL_REGISTRY.register_processor(IvcpQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class IvcpQwen2VLForConditionalGeneration(PrunedPrefillMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with ivcp's pruning inside the LLM; a request without a method runs as vLLM's model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ivcp_init(vllm_config)
