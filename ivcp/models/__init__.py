"""Model classes transformers does not ship (assembled from its parts), one file per family; and the processors
(``*_processor.py``) that transformers cannot build without torchvision. Importing this package registers them
all with the Auto classes."""

from .deepseek_vl2 import DeepseekVL2Config, DeepseekVL2ForConditionalGeneration, DeepseekVL2Model
from .deepseek_vl2_processor import DeepseekVL2ImageProcessor, DeepseekVL2Processor
from .internvl_processor import InternVLTilesProcessor

__all__ = ["DeepseekVL2Config", "DeepseekVL2ForConditionalGeneration", "DeepseekVL2ImageProcessor", "DeepseekVL2Model",
           "DeepseekVL2Processor", "InternVLTilesProcessor"]
