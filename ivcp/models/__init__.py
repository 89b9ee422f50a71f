"""Model classes transformers does not ship (assembled from its parts), one file per family."""

from .deepseek_vl2 import DeepseekVL2Config, DeepseekVL2ForConditionalGeneration, DeepseekVL2Model

__all__ = ["DeepseekVL2Config", "DeepseekVL2ForConditionalGeneration", "DeepseekVL2Model"]
