"""A model folder vLLM can serve: the checkpoint's config and weights plus a real processor.

ivcp's tiny models are shipped (or built) without tokenizer and processor files; vLLM loads both from
the model folder. :func:`serving_folder` writes them beside a copy of the checkpoint: the tiny byte
tokenizer and transformers' own ``Qwen2_5_VLProcessor`` (``Qwen2VLImageProcessor`` with the tiny
processor's pixel bounds; its video processor too), so vLLM and ivcp's HF path see the same pixels and token ids.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def serving_folder(out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write a vLLM-servable folder for a tiny Qwen2.5-VL checkpoint (default: the tiny grounder) to
    ``out`` and return it. Idempotent: an existing complete folder is reused."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from ..testing.grounder import GROUNDER_DIR
    from ..testing.qwen import tiny_processor

    src = Path(checkpoint) if checkpoint is not None else GROUNDER_DIR
    out = Path(out)
    if (out / "processor_config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {src} (config.json)")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    tiny = tiny_processor("qwen2_5_vl")
    pil = tiny.image_processor
    image_processor = Qwen2VLImageProcessor(size=dict(pil.size), patch_size=pil.patch_size,
                                            temporal_patch_size=pil.temporal_patch_size, merge_size=pil.merge_size,
                                            image_mean=pil.image_mean, image_std=pil.image_std)
    video_processor = Qwen2VLVideoProcessor(size=dict(pil.size), patch_size=pil.patch_size,
                                            temporal_patch_size=pil.temporal_patch_size, merge_size=pil.merge_size)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tiny.tokenizer,
                                    video_processor=video_processor,
                                    chat_template=tiny.chat_template)
    processor.save_pretrained(out)
    return out
