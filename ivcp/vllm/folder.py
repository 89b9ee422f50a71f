"""A model folder vLLM can serve: the checkpoint's config and weights plus a real processor.

ivcp's tiny models are shipped (or built) without tokenizer and processor files; vLLM loads both from
the model folder. :func:`serving_folder` writes them beside the checkpoint: the tiny byte tokenizer and
transformers' own processor class of the family (``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor`` /
``Qwen3VLProcessor`` around ``Qwen2VLImageProcessor`` with the tiny processor's settings; its video
processor too), so vLLM and ivcp's HF path see the same pixels and token ids.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# vLLM's CPU attention takes head sizes of 32 and more: the tiny random models get two heads of 32
# (one KV head) and M-RoPE sections that sum to 16
SERVABLE_TINY = {
    "qwen2_vl": dict(num_attention_heads=2, num_key_value_heads=1,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]}),
    "qwen3_vl": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                     rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 6, 6],
                                      "mrope_interleaved": True}),
}


def serving_folder(out: str | Path, checkpoint: str | Path | None = None, family: str | None = None) -> Path:
    """Write a vLLM-servable folder to ``out`` and return it: a tiny Qwen2.5-VL checkpoint (default: the
    tiny grounder), or with ``family`` (``qwen2_vl``, ``qwen3_vl``) a tiny random model of that family
    (ivcp.testing, seed 0, heads of 32). Idempotent: an existing complete folder is reused."""
    import torch
    from transformers import Qwen2VLImageProcessor

    out = Path(out)
    if (out / "processor_config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if family is not None and checkpoint is not None:
        raise ValueError("serving_folder: give a checkpoint or a tiny family, not both")
    if family is not None and family not in SERVABLE_TINY:
        raise ValueError(f"serving_folder: tiny families are {', '.join(SERVABLE_TINY)}, not {family!r}")
    out.mkdir(parents=True, exist_ok=True)
    if family is None:
        from ..testing.grounder import GROUNDER_DIR

        src = Path(checkpoint) if checkpoint is not None else GROUNDER_DIR
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint in {src} (config.json)")
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        family = "qwen2_5_vl"
    else:
        from ..testing import tiny_model

        model, _ = tiny_model(family, dtype=torch.float32, **SERVABLE_TINY[family])
        model.save_pretrained(out)
    from .. import testing

    tiny = testing.tiny_processor(family)
    pil = tiny.image_processor
    settings = dict(size=dict(pil.size), patch_size=pil.patch_size, temporal_patch_size=pil.temporal_patch_size,
                    merge_size=pil.merge_size, image_mean=pil.image_mean, image_std=pil.image_std)
    import transformers

    processor_class, video_class = {"qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
                                     "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
                                     "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor")}[family]
    video_settings = {k: v for k, v in settings.items() if k not in ("image_mean", "image_std")} \
        if family == "qwen2_5_vl" else settings
    processor = getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(**settings), tokenizer=tiny.tokenizer,
        video_processor=getattr(transformers, video_class)(**video_settings), chat_template=tiny.chat_template)
    processor.save_pretrained(out)
    return out
