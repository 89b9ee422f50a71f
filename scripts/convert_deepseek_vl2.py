#!/usr/bin/env python
"""Convert a released DeepSeek-VL2 checkpoint (remote code: ``DeepseekVLV2ForCausalLM``, for transformers
4.38–4.51) into ivcp's native ``DeepseekVL2ForConditionalGeneration`` layout, offline.

    python scripts/convert_deepseek_vl2.py --src /models/deepseek-vl2-small --out /models/deepseek-vl2-small-ivcp

Reads ``config.json``, the safetensors shards (or ``pytorch_model.bin``), ``processor_config.json`` and the
tokenizer; writes the native ``config.json`` + safetensors, the tokenizer with the tokens the released processor
adds when it loads (``<｜▁pad▁｜>`` when there is no pad token, ``<image>``, ``<|ref|>``, ``<|/ref|>``, ``<|det|>``,
``<|/det|>``, ``<|grounding|>``, ``<|User|>``, ``<|Assistant|>``, in that order, each only if missing) and the
processor (``processor_config.json``: ivcp's ``DeepseekVL2Processor`` and ``DeepseekVL2ImageProcessor``, with the chat
template). Load the result with ``ivcp.models.DeepseekVL2ForConditionalGeneration.from_pretrained`` and
``ivcp.models.deepseek_vl2_processor.DeepseekVL2Processor.from_pretrained`` (or, after ``import ivcp.models``, with
``AutoModelForImageTextToText`` / ``AutoProcessor``).

The key mapping (``ivcp.models.deepseek_vl2.state_dict_from_remote``): timm SigLIP → transformers' SigLIP (fused
``attn.qkv`` split into q, k, v; ``pos_embed`` → the position embedding; ``norm1/2`` → ``layer_norm1/2``; the
final ``norm`` → ``post_layernorm``; the unused ``attn_pool`` head dropped); ``projector.layers.*`` kept;
``view_seperator`` → ``view_separator``; ``language.model.*`` → ``model.language_model.*`` with each MoE layer's
experts stacked into transformers' fused ``gate_up_proj`` (gate rows then up rows) and ``down_proj``;
``language.lm_head`` → ``lm_head``. DeepSeek-VL2-Tiny (``use_mla: false``) keeps its q / k / v / o projections for
ivcp's multi-head attention layer. Settings transformers' DeepseekV2 lacks are refused by name (``noaux_tc`` /
sigmoid routing, ``norm_topk_prob``, ``rope_scaling``). Exit status 2 on a checkpoint it cannot convert, naming the
problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# the tokens the released processor adds when it loads (DeepseekVLV2Processor.__init__), in its order
ADDED_TOKENS = ("<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>")
PAD_TOKEN = "<｜▁pad▁｜>"


def read_remote(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} does not exist")
    remote = json.loads(config_path.read_text())
    missing = [k for k in ("vision_config", "projector_config", "language_config") if k not in remote]
    if missing:
        raise ValueError(f"{config_path} is not a DeepSeek-VL2 remote-code config: no {', '.join(missing)}")
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard)))
    elif (src / "pytorch_model.bin").is_file():
        state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"no weights in {src} (*.safetensors or pytorch_model.bin)")
    return remote, state


def prepare_tokenizer(src: Path):
    """The released tokenizer with the tokens the released processor adds (each only if missing)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception as error:  # noqa: BLE001 - any loading failure is reported with the folder
        raise ValueError(f"cannot load the tokenizer in {src}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    vocab = tokenizer.get_vocab()
    missing = [t for t in ADDED_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def convert(src: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    from ivcp.loading import build_converted
    from ivcp.models.deepseek_vl2 import DeepseekVL2ForConditionalGeneration, config_from_remote, state_dict_from_remote
    from ivcp.models.deepseek_vl2_processor import DeepseekVL2Processor

    src, out = Path(src), Path(out)
    remote, state = read_remote(src)
    tokenizer = prepare_tokenizer(src)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = config_from_remote(remote, image_token_id)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer ({len(tokenizer)} tokens with the added ones) exceeds the model's vocabulary "
                         f"({config.text_config.vocab_size})")
    model = build_converted(DeepseekVL2ForConditionalGeneration, config, state_dict_from_remote(state, config), dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    settings = {}
    if (src / "processor_config.json").is_file():
        released = json.loads((src / "processor_config.json").read_text())
        settings = {k: released[k] for k in ("patch_size", "downsample_ratio", "image_mean", "image_std") if k in released}
    vision = config.vision_config
    settings.setdefault("patch_size", vision.patch_size)
    settings.setdefault("downsample_ratio", config.downsample_ratio)
    processor = DeepseekVL2Processor.from_settings(tokenizer, tile_size=config.tile_size,
                                                   candidate_resolutions=config.candidate_resolutions,
                                                   max_tiled_images=config.max_tiled_images, **settings)
    if processor.tokens_per_side != config.tokens_per_side:
        raise ValueError(f"processor_config.json's patch_size / downsample_ratio give {processor.tokens_per_side} "
                         f"tokens a tile side, the model {config.tokens_per_side}")
    processor.save_pretrained(str(out))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the released (remote-code) checkpoint folder")
    parser.add_argument("--out", required=True, help="where to write the native checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.out, args.dtype)
    except ValueError as error:
        print(f"convert_deepseek_vl2: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
