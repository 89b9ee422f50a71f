"""scripts/convert_deepseek_vl2.py on a tiny random checkpoint in the released remote-code layout (config.json with
vision / projector / language configs, timm SigLIP keys, one module per MoE expert, a tokenizer without the tokens
the released processor adds): the converted folder loads in the native class and processor and gives the logits
of the hand-written remote-layout forward; unsupported checkpoints are refused by name."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ivcp.models.deepseek_vl2 import DeepseekVL2ForConditionalGeneration
from ivcp.models.deepseek_vl2_processor import DeepseekVL2Processor
from ivcp.testing import deepseek_vl2 as tiny
from ivcp.testing import make_image, make_inputs
from ivcp.testing.tokenizer import byte_tokenizer

from test_deepseek_vl2 import reference_logits

ROOT = Path(__file__).resolve().parent.parent


def _converter():
    spec = importlib.util.spec_from_file_location("convert_deepseek_vl2", ROOT / "scripts/convert_deepseek_vl2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def remote_folder(folder: Path, family: str = "deepseek_vl2", **language_overrides) -> dict:
    """A released-layout checkpoint of the tiny architecture (MLA, or ``deepseek_vl2_mha``: DeepSeek-VL2-Tiny's
    multi-head attention); returns its weights."""
    cfg = tiny.tiny_config(family)
    t, v = cfg.text_config, cfg.vision_config
    language = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    moe_intermediate_size=t.moe_intermediate_size, num_hidden_layers=t.num_hidden_layers,
                    num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                    q_lora_rank=None, kv_lora_rank=t.kv_lora_rank, qk_nope_head_dim=t.qk_nope_head_dim,
                    qk_rope_head_dim=t.qk_rope_head_dim, v_head_dim=t.v_head_dim, n_routed_experts=t.n_routed_experts,
                    num_experts_per_tok=t.num_experts_per_tok, n_shared_experts=t.n_shared_experts,
                    first_k_dense_replace=t.first_k_dense_replace, topk_method="greedy", n_group=1, topk_group=1,
                    routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", use_mla=cfg.use_mla,
                    moe_layer_freq=1, vocab_size=t.vocab_size, rope_theta=10000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=4096, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
    language.update(language_overrides)
    config = {"architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2", "tile_tag": "2D",
              "global_view_pos": "head", "candidate_resolutions": cfg.candidate_resolutions,
              "vision_config": {"model_name": "siglip_so400m_patch14_384", "image_size": v.image_size,
                                "patch_size": v.patch_size, "width": v.hidden_size, "layers": v.num_hidden_layers,
                                "heads": v.num_attention_heads, "mlp_ratio": v.intermediate_size / v.hidden_size,
                                "global_pool": "map", "ignore_head": True, "class_token": False},
              "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": v.hidden_size,
                                   "n_embed": t.hidden_size, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2},
              "language_config": language}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "processor_config.json").write_text(json.dumps(
        {"candidate_resolutions": cfg.candidate_resolutions, "patch_size": v.patch_size, "downsample_ratio": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_token": "<image>",
         "pad_token": tiny.PAD, "sft_format": "deepseek"}))
    # the released tokenizer lacks the processor's added tokens and the pad token
    tokenizer = byte_tokenizer((tiny.EOS, tiny.BOS), eos_token=tiny.EOS, pad_token=None, chat_template="")
    tokenizer.bos_token = tiny.BOS
    tokenizer.save_pretrained(folder)
    weights = tiny.remote_state_dict(cfg, seed=3)
    from safetensors.torch import save_file

    save_file(weights, str(folder / "model.safetensors"))
    return weights


@pytest.mark.parametrize("family", ["deepseek_vl2", "deepseek_vl2_mha"])
def test_converted_checkpoint_matches_the_remote_layout_forward(tmp_path, family):
    weights = remote_folder(tmp_path / "remote", family)
    assert _converter().main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "native")]) == 0
    model = DeepseekVL2ForConditionalGeneration.from_pretrained(tmp_path / "native").eval()
    processor = DeepseekVL2Processor.from_pretrained(str(tmp_path / "native"))
    # the released processor's additions, in its order, after the 256 bytes, end and begin of sentence
    added = (tiny.PAD, "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>")
    assert [processor.tokenizer.convert_tokens_to_ids(t) for t in added] == list(range(258, 267))
    assert model.config.image_token_id == 259 and processor.tokenizer.pad_token == tiny.PAD
    inputs = make_inputs(processor, "Where is the box?", images=[make_image(90, 40)])
    assert int((inputs["input_ids"] == 259).sum()) == 3 * 4 + 1 + 2 * 3 * (3 * 3 + 1)  # 2 x 3 tiles
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        expected = reference_logits(weights, model.config, inputs["input_ids"], inputs["pixel_values"], inputs["image_tiles"])
    assert (logits - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.config.use_mla == (family == "deepseek_vl2")


@pytest.mark.parametrize("override,message", [({"topk_method": "noaux_tc"}, "topk_method"),
                                              ({"rope_scaling": {"type": "yarn", "factor": 40}}, "rope_scaling"),
                                              ({"scoring_func": "sigmoid"}, "scoring_func"),
                                              ({"norm_topk_prob": True}, "norm_topk_prob")])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, capsys, override, message):
    remote_folder(tmp_path / "remote", **override)
    assert _converter().main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_missing_files_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _converter().main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


# DeepSeek-VL2-Small's language_config as released (deepseek-ai/deepseek-vl2-small config.json, read in a public copy,
# mlx-community/deepseek-vl2-small-8bit: its keys in order, none of kv_lora_rank, qk_* / v_head_dim, bos / eos,
# norm_topk_prob among them); q_lora_rank's value and the keys after it were cut off in that copy: null, greedy and
# 1 as in DeepSeek-V2-Lite, whose shape Small has (docs/deepseek_vl2.md)
SMALL_LANGUAGE = dict(first_k_dense_replace=1, hidden_size=2048, intermediate_size=10944, lm_head=True,
                      max_position_embeddings=4096, model_type="deepseek_v2", moe_intermediate_size=1408, n_group=1,
                      n_routed_experts=64, n_shared_experts=2, num_attention_heads=16, num_experts_per_tok=6,
                      num_hidden_layers=27, num_key_value_heads=16, q_lora_rank=None, topk_method="greedy", topk_group=1)


def test_keys_the_release_leaves_out_take_the_remote_codes_defaults():
    """Small's config.json leaves out kv_lora_rank, the head dims, bos / eos and rope_scaling: the converted config
    takes the remote code's defaults (kv_lora_rank 512, rotary 64 of 192 dims, values 128, θ 1e4 without scaling,
    begin / end of sentence 100000 / 100001), not transformers' (whose bos / eos are 1 / 2), and agrees with
    configs/architectures/deepseek_vl2_small.json field by field."""
    from ivcp.models.deepseek_vl2 import config_from_remote

    config = config_from_remote({"language_config": dict(SMALL_LANGUAGE)}, image_token_id=100003)
    text = config.text_config
    assert (text.kv_lora_rank, text.q_lora_rank, text.qk_rope_head_dim, text.qk_nope_head_dim, text.v_head_dim) == \
        (512, None, 64, 128, 128)
    assert (text.bos_token_id, text.eos_token_id, text.vocab_size) == (100000, 100001, 102400)
    assert text.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0} and config.use_mla
    assert not text.norm_topk_prob and text.routed_scaling_factor == 1.0
    without_heads = {k: v for k, v in SMALL_LANGUAGE.items() if k != "num_key_value_heads"}
    assert config_from_remote({"language_config": without_heads}, 100003).text_config.num_key_value_heads == 16
    bench = json.loads((ROOT / "configs/architectures/deepseek_vl2_small.json").read_text())
    for key, value in bench["text_config"].items():
        assert getattr(text, key) == value, key
    assert bench["image_token_id"] == config.image_token_id
