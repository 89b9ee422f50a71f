#!/usr/bin/env python
"""Convert an InternVL 2.5 remote-code checkpoint (``InternVLChatModel``: InternViT + ``mlp1`` + InternLM2
or Qwen2) into transformers' native ``InternVLForConditionalGeneration`` layout, offline.

    python scripts/convert_internvl.py --src /models/InternVL2_5-8B-remote --out /models/InternVL2_5-8B

Writes a complete native folder: ``config.json`` + safetensors; the tokenizer, loadable without remote code
and encoding as the remote one does (InternLM2: ``tokenization_internlm2.py``'s ``InternLM2Tokenizer`` puts
BOS first, ``add_bos_token=True``; the sentencepiece ``tokenizer.model`` becomes a native ``LlamaTokenizer``
with the same BOS rule and added tokens; Qwen2: its native tokenizer, as it is), with InternVL's image
tokens named for ``InternVLProcessor``; ``preprocessor_config.json`` / ``processor_config.json`` (448-px tiles,
ImageNet mean / std, bicubic, 1..``max_dynamic_patch`` tiles + thumbnail, ``image_seq_length`` tokens per
tile; the processor is ivcp's ``InternVLTilesProcessor``: ``AutoProcessor`` loads it after ``import ivcp.models``)
and ``chat_template.jinja`` (the remote chat()'s format and system message); and ``generation_config.json``
whose stop token is ``<|im_end|>``, as the remote ``chat()`` forces
(``modeling_internvl_chat.py``: ``eos_token_id`` = the template separator's id).
The key mapping follows the public facts of transformers' own conversion script: vision keys renamed
(``layers`` → ``layer``, ``ls1/ls2`` → ``lambda_1/2``, ``norm1/2`` → ``layernorm_before/after``, ``attn.proj``
→ ``attention.projection_layer``, ``class_embedding`` → ``cls_token`` …) with the fused ``attn.qkv`` split
into q, k, v rows; ``mlp1.0/1/3`` → the projector's layer norm and linears; an InternLM2 decoder becomes a
Llama decoder: ``wqkv`` holds, for each KV head j, G = heads / kv_heads query heads then one key head
and one value head (rows ``(j·(G + 2) + s)·d + e``), split into ``q_proj``, ``k_proj``, ``v_proj``;
``wo`` → ``o_proj``, ``feed_forward.w1/w3/w2`` → ``mlp.gate/up/down_proj``, ``attention_norm`` /
``ffn_norm`` → ``input_layernorm`` / ``post_attention_layernorm``, ``tok_embeddings`` → ``embed_tokens``,
``output`` → ``lm_head``. A Qwen2 decoder keeps its names. ``<IMG_CONTEXT>`` is token 92546 in InternLM2's
vocabulary, 151667 in Qwen2's (override with --image-token-id). Exit status 2 on a checkpoint it cannot
read, naming what is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

IMAGE_TOKEN = {"llama": 92546, "qwen2": 151667}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
# InternVLProcessor reads these names from the tokenizer
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
STOP_TOKEN = "<|im_end|>"
# the system message of the remote chat()'s internvl2_5 template (conversation.py)
SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
VISION_RENAMES = [  # applied in order to the part after "vision_model."
    (r"^encoder\.layers\.", "encoder.layer."), (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"), (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."), (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after."),
]
INTERNLM2_RENAMES = [
    (r"^tok_embeddings\.", "embed_tokens."), (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."), (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."), (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]
PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
             "mlp1.3.": "model.multi_modal_projector.linear_2."}


def language_model_type(llm_config: dict) -> str:
    arch = (llm_config.get("architectures") or [""])[0]
    if arch.startswith("InternLM2"):
        return "llama"
    if arch.startswith("Qwen2"):
        return "qwen2"
    raise ValueError(f"unknown language model {arch!r} in llm_config (InternLM2 or Qwen2 expected)")


def split_wqkv(weight: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's grouped ``wqkv`` rows → (q, k, v) rows (weights (rows, hidden) or biases (rows,))."""
    groups = heads // kv_heads
    blocks = weight.reshape(kv_heads, groups + 2, head_dim, *weight.shape[1:])
    q = blocks[:, :groups].reshape(heads * head_dim, *weight.shape[1:])
    return q, blocks[:, groups].reshape(kv_heads * head_dim, *weight.shape[1:]), \
        blocks[:, groups + 1].reshape(kv_heads * head_dim, *weight.shape[1:])


def native_config(remote: dict, image_token_id: int | None = None):
    """The native ``InternVLConfig`` of a remote-code ``config.json``."""
    from transformers import InternVLConfig

    llm, vision = dict(remote["llm_config"]), dict(remote["vision_config"])
    lm_type = language_model_type(llm)
    text = {k: llm[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps")
            if k in llm}
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    scaling = llm.get("rope_scaling") or {}
    if scaling.get("type") == "dynamic" or scaling.get("rope_type") == "dynamic":
        rope = {"rope_type": "dynamic", "factor": float(scaling["factor"]), "rope_theta": rope["rope_theta"]}
    text.update(model_type=lm_type, rope_parameters=rope, tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in llm:
            text[key] = llm[key]
    vision_config = {
        "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"], "num_attention_heads": vision["num_attention_heads"],
        "image_size": vision["image_size"], "patch_size": vision["patch_size"],
        "attention_bias": bool(vision.get("qkv_bias", True)), "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"), "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "use_mean_pooling": True, "use_absolute_position_embeddings": True,
        "hidden_act": vision.get("hidden_act", "gelu"),
    }
    side = vision["image_size"] // vision["patch_size"]
    ratio = float(remote.get("downsample_ratio", 0.5))
    return InternVLConfig(vision_config=vision_config, text_config=text,
                          image_token_id=image_token_id or IMAGE_TOKEN[lm_type],
                          image_seq_length=int(side * side * ratio * ratio), downsample_ratio=ratio,
                          projector_hidden_act="gelu", vision_feature_layer=int(remote.get("select_layer", -1)),
                          vision_feature_select_strategy="default", tie_word_embeddings=text["tie_word_embeddings"])


def convert_state_dict(remote_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Remote-code keys → the native class's (in-memory) parameter names."""
    text = config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = text.hidden_size // heads
    internlm2 = text.model_type == "llama"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in remote_state.items():
        if key.startswith("vision_model."):
            name = key[len("vision_model."):]
            for pattern, repl in VISION_RENAMES:
                name = re.sub(pattern, repl, name)
            if ".attention.qkv." in name:
                dim = tensor.shape[0] // 3
                for part, chunk in zip("qkv", (tensor[:dim], tensor[dim:2 * dim], tensor[2 * dim:])):
                    out["model.vision_tower." + name.replace(".qkv.", f".{part}_proj.")] = chunk.clone()
                continue
            out["model.vision_tower." + name] = tensor
        elif key.startswith("mlp1."):
            prefix = next((p for p in PROJECTOR if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"unexpected projector key {key}")
            out[PROJECTOR[prefix] + key[len(prefix):]] = tensor
        elif key.startswith("language_model."):
            name = key[len("language_model."):]
            if name.startswith("output.") or name.startswith("lm_head."):
                out["lm_head." + name.split(".", 1)[1]] = tensor
                continue
            if not name.startswith("model."):
                raise ValueError(f"unexpected language model key {key}")
            name = name[len("model."):]
            if internlm2:
                for pattern, repl in INTERNLM2_RENAMES:
                    name = re.sub(pattern, repl, name)
                if ".attention.wqkv." in name:
                    for part, chunk in zip("qkv", split_wqkv(tensor, heads, kv_heads, head_dim)):
                        out["model.language_model." + name.replace(".attention.wqkv.", f".self_attn.{part}_proj.")] = chunk.clone()
                    continue
            out["model.language_model." + name] = tensor
        else:
            raise ValueError(f"unexpected key {key} (neither vision_model., mlp1. nor language_model.)")
    return out


def read_remote(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} does not exist")
    remote = json.loads(config_path.read_text())
    missing = [k for k in ("llm_config", "vision_config") if k not in remote]
    if missing:
        raise ValueError(f"{config_path} is not an InternVL remote-code config: no {', '.join(missing)}")
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
    elif (src / "pytorch_model.bin").is_file():
        state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"no weights in {src} (*.safetensors or pytorch_model.bin)")
    return remote, state


def convert(src: str | Path, out: str | Path, image_token_id: int | None = None, dtype: str = "auto") -> Path:
    from transformers import InternVLForConditionalGeneration

    from ivcp.loading import build_converted

    src, out = Path(src), Path(out)
    remote, state = read_remote(src)
    config = native_config(remote, image_token_id)
    model = build_converted(InternVLForConditionalGeneration, config, convert_state_dict(state, config), dtype)
    model.save_pretrained(out)
    tokenizer = write_tokenizer(src, out, config.text_config.model_type)
    write_processor(remote, out, config.image_seq_length)
    write_generation_config(out, tokenizer)
    return out


def write_tokenizer(src: Path, out: Path, lm_type: str):
    """The native tokenizer in ``out`` (see the module docstring); returns it."""
    import tempfile

    from transformers import AutoTokenizer

    config_path = src / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not any((src / name).is_file() for name in ("tokenizer.model", "tokenizer.json", "vocab.json")):
        raise ValueError(f"no tokenizer in {src} (tokenizer.model, tokenizer.json or vocab.json)")
    config.pop("auto_map", None)  # the remote classes are not needed any more
    if lm_type == "llama":  # InternLM2Tokenizer (sentencepiece): BOS first, no EOS, as the remote class does
        if not (src / "tokenizer.model").is_file():
            raise ValueError(f"no tokenizer.model in {src} (InternLM2's sentencepiece model)")
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=config.get("add_bos_token", True),
                      add_eos_token=config.get("add_eos_token", False), legacy=True)
        config.setdefault("bos_token", "<s>")
        config.setdefault("eos_token", "</s>")
        config.setdefault("unk_token", "<unk>")
    extra = config.get("extra_special_tokens")
    config["extra_special_tokens"] = dict(extra if isinstance(extra, dict) else {}, **IMAGE_TOKENS)
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging)
        # InternLM2: rebuilt from the sentencepiece model (a tokenizer.json there would be the remote fast class's)
        skip = {"tokenizer_config.json"} | ({"tokenizer.json"} if lm_type == "llama" else set())
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and name not in skip:
                shutil.copy(src / name, staged / name)
        (staged / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(staged)
    tokenizer.save_pretrained(out)
    if (src / "tokenizer.model").is_file():
        shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return tokenizer


def write_processor(remote: dict, out: Path, image_seq_length: int) -> None:
    """``preprocessor_config.json`` (InternVL's tiling: GotOcr2ImageProcessor), ``processor_config.json`` (ivcp's
    ``InternVLTilesProcessor``: no torchvision, the images' sizes returned) and ``chat_template.jinja`` (the remote
    chat()'s format with its default system message)."""
    from ivcp.models.internvl_processor import chat_template

    size = int(remote["vision_config"]["image_size"])
    image = {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": True, "min_patches": 1,
             "max_patches": int(remote.get("max_dynamic_patch", 12)), "size": {"height": size, "width": size},
             "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    processor = {"processor_class": "InternVLTilesProcessor", "image_seq_length": image_seq_length,
                 "start_image_token": IMAGE_TOKENS["start_image_token"], "end_image_token": IMAGE_TOKENS["end_image_token"],
                 "image_token": IMAGE_TOKENS["context_image_token"]}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "chat_template.jinja").write_text(chat_template(SYSTEM_MESSAGE))


def write_generation_config(out: Path, tokenizer) -> None:
    """``generation_config.json``: generation stops at ``<|im_end|>`` (the remote chat()'s eos_token_id)."""
    from transformers import GenerationConfig

    stop = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if stop is None or stop == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {STOP_TOKEN} token (the chat template's turn end)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop, pad_token_id=pad).save_pretrained(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the remote-code checkpoint folder")
    parser.add_argument("--out", required=True, help="where to write the native checkpoint")
    parser.add_argument("--image-token-id", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.out, args.image_token_id, args.dtype)
    except ValueError as error:
        print(f"convert_internvl: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
