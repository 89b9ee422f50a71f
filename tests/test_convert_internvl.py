"""scripts/convert_internvl.py on a tiny random checkpoint in the InternVL2.5 remote-code layout: the
converted model loads in the native class and gives the logits of a reference written here by hand
from the remote weights (InternViT with fused qkv and layer scale, pixel shuffle v2, mlp1, an InternLM2
decoder with grouped wqkv)."""

import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
D, VD, HEADS, KV, LAYERS, VOCAB, CONTEXT = 64, 32, 4, 2, 2, 300, 290
HD = D // HEADS


def _converter():
    spec = importlib.util.spec_from_file_location("convert_internvl", ROOT / "scripts/convert_internvl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def remote_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape, s=0.2: (torch.randn(*shape, generator=g) * s)  # noqa: E731
    sd = {"vision_model.embeddings.class_embedding": r(1, 1, VD), "vision_model.embeddings.patch_embedding.weight": r(VD, 3, 8, 8),
          "vision_model.embeddings.patch_embedding.bias": r(VD), "vision_model.embeddings.position_embedding": r(1, 65, VD)}
    for i in range(2):
        p = f"vision_model.encoder.layers.{i}."
        sd.update({p + "attn.qkv.weight": r(3 * VD, VD), p + "attn.qkv.bias": r(3 * VD), p + "attn.proj.weight": r(VD, VD),
                   p + "attn.proj.bias": r(VD), p + "ls1": r(VD), p + "ls2": r(VD), p + "norm1.weight": 1 + r(VD),
                   p + "norm1.bias": r(VD), p + "norm2.weight": 1 + r(VD), p + "norm2.bias": r(VD),
                   p + "mlp.fc1.weight": r(64, VD), p + "mlp.fc1.bias": r(64), p + "mlp.fc2.weight": r(VD, 64),
                   p + "mlp.fc2.bias": r(VD)})
    sd.update({"mlp1.0.weight": 1 + r(4 * VD), "mlp1.0.bias": r(4 * VD), "mlp1.1.weight": r(D, 4 * VD), "mlp1.1.bias": r(D),
               "mlp1.3.weight": r(D, D), "mlp1.3.bias": r(D), "language_model.model.tok_embeddings.weight": r(VOCAB, D),
               "language_model.model.norm.weight": 1 + r(D), "language_model.output.weight": r(VOCAB, D)})
    for i in range(LAYERS):
        p = f"language_model.model.layers.{i}."
        sd.update({p + "attention.wqkv.weight": r((HEADS + 2 * KV) * HD, D), p + "attention.wo.weight": r(D, D),
                   p + "feed_forward.w1.weight": r(128, D), p + "feed_forward.w3.weight": r(128, D),
                   p + "feed_forward.w2.weight": r(D, 128), p + "attention_norm.weight": 1 + r(D),
                   p + "ffn_norm.weight": 1 + r(D)})
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    config = {"architectures": ["InternVLChatModel"], "downsample_ratio": 0.5, "select_layer": -1, "template": "internvl2_5",
              "llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": D, "intermediate_size": 128,
                             "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
                             "vocab_size": VOCAB, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
                             "rope_theta": 10000.0, "bias": False},
              "vision_config": {"hidden_size": VD, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "image_size": 64, "patch_size": 8, "qkv_bias": True, "qk_normalization": False,
                                "norm_type": "layer_norm", "layer_norm_eps": 1e-6}}
    (folder / "config.json").write_text(json.dumps(config))
    remote_tokenizer(folder)
    return sd


REMOTE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def remote_tokenizer(folder: Path) -> None:
    """InternVL2.5-8B's tokenizer layout, tiny: a sentencepiece tokenizer.model (its chat and image tokens as
    user-defined pieces) and a tokenizer_config.json naming the remote InternLM2Tokenizer (add_bos_token true)."""
    import io

    import sentencepiece as spm

    text = ["where is the red square in the picture", "a small tokenizer made for the tests", "the quick brown fox"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=80, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=REMOTE_SPECIALS,
                                   character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for t in REMOTE_SPECIALS}
    config = {"tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
              "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "</s>", "added_tokens_decoder": added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def reference_logits(sd, input_ids, pixel_values):
    """InternVL2.5 by hand, from the remote layout's weights."""
    x = F.conv2d(pixel_values, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, VD), x], 1)
    x = x + sd["vision_model.embeddings.position_embedding"]
    for i in range(2):
        p = f"vision_model.encoder.layers.{i}."
        h = F.layer_norm(x, (VD,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).chunk(3, -1)
        split = lambda t: t.view(t.shape[0], t.shape[1], 2, VD // 2).transpose(1, 2)  # noqa: E731
        att = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(VD // 2)).softmax(-1) @ split(v)
        x = x + sd[p + "ls1"] * (att.transpose(1, 2).reshape(x.shape) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (VD,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        x = x + sd[p + "ls2"] * (F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
                                 + sd[p + "mlp.fc2.bias"])
    grid = x[:, 1:].view(x.shape[0], 8, 8, VD)  # pixel shuffle v2: token (r, c) = patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)
    cells = torch.cat([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], -1)
    feats = F.layer_norm(cells.reshape(-1, 4 * VD), (4 * VD,), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    feats = F.gelu(feats @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"]) @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]
    h = sd["language_model.model.tok_embeddings.weight"][input_ids[0]].clone()
    h[input_ids[0] == CONTEXT] = feats
    n = h.shape[0]
    inv = 10000.0 ** (-torch.arange(0, HD, 2).float() / HD)
    angles = torch.arange(n).float()[:, None] * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rot = lambda t: t * cos + torch.cat([-t[..., HD // 2:], t[..., :HD // 2]], -1) * sin  # noqa: E731
    rms = lambda t, w: w * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    causal = torch.ones(n, n).tril().bool()
    for i in range(LAYERS):
        p = f"language_model.model.layers.{i}."
        qkv = (rms(h, sd[p + "attention_norm.weight"]) @ sd[p + "attention.wqkv.weight"].T).view(n, KV, HEADS // KV + 2, HD)
        q, k, v = qkv[:, :, :-2].reshape(n, HEADS, HD), qkv[:, :, -2], qkv[:, :, -1]  # query head j·G + s
        k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
        q, k = rot(q.transpose(0, 1)), rot(k.transpose(0, 1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(HD)).masked_fill(~causal, float("-inf"))
        h = h + (scores.softmax(-1) @ v.transpose(0, 1)).transpose(0, 1).reshape(n, D) @ sd[p + "attention.wo.weight"].T
        m = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(m @ sd[p + "feed_forward.w1.weight"].T) * (m @ sd[p + "feed_forward.w3.weight"].T)) @ \
            sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["language_model.model.norm.weight"]) @ sd["language_model.output.weight"].T


def test_converted_checkpoint_matches_a_reference_by_hand(tmp_path):
    from transformers import InternVLForConditionalGeneration

    sd = remote_checkpoint(tmp_path / "remote")
    converter = _converter()
    assert converter.main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "native"),
                           "--image-token-id", str(CONTEXT)]) == 0
    model = InternVLForConditionalGeneration.from_pretrained(tmp_path / "native", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    assert type(model.model.language_model).__name__ == "LlamaModel"
    input_ids = torch.tensor([[5, 6, 7, CONTEXT - 2] + [CONTEXT] * 16 + [CONTEXT - 1, 8, 9, 10]])
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]
        expected = reference_logits(sd, input_ids, pixel_values)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_wqkv_split_by_hand():
    converter = _converter()
    # 2 KV heads, G = 2 query heads each, head_dim 1: rows [q0 q1 k0 v0 | q2 q3 k1 v1]
    rows = torch.arange(8.0)[:, None]
    q, k, v = converter.split_wqkv(rows, heads=4, kv_heads=2, head_dim=1)
    assert q.flatten().tolist() == [0, 1, 4, 5] and k.flatten().tolist() == [2, 6] and v.flatten().tolist() == [3, 7]


def test_bad_checkpoints_are_named(tmp_path, capsys):
    converter = _converter()
    (tmp_path / "empty").mkdir()
    assert converter.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert converter.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no llm_config, vision_config" in capsys.readouterr().err


def test_converted_folder_is_complete(tmp_path):
    """The tokenizer encodes as the remote InternLM2Tokenizer does (BOS, then the sentencepiece ids), loads without
    remote code, names InternVL's image tokens; the processor configs are written; generation stops at <|im_end|>."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, GenerationConfig, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration
    from transformers import LogitsProcessor, LogitsProcessorList

    remote_checkpoint(tmp_path / "remote")
    assert _converter().main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "native"),
                              "--image-token-id", str(CONTEXT)]) == 0
    native = tmp_path / "native"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "remote" / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(native)
    for text in ("where is the red square", "the quick brown fox in the picture"):
        ids = tokenizer(text).input_ids
        assert ids[0] == sp.bos_id() == tokenizer.bos_token_id  # InternLM2Tokenizer: add_bos_token
        assert ids == [sp.bos_id()] + sp.encode(text)
    im_end = sp.piece_to_id("<|im_end|>")
    assert tokenizer("<|im_start|>user").input_ids[:2] == [1, sp.piece_to_id("<|im_start|>")]
    assert (tokenizer.context_image_token, tokenizer.start_image_token, tokenizer.end_image_token) == \
        ("<IMG_CONTEXT>", "<img>", "</img>")
    assert json.loads((native / "processor_config.json").read_text()) == {
        "processor_class": "InternVLTilesProcessor", "image_seq_length": 16, "start_image_token": "<img>",
        "end_image_token": "</img>", "image_token": "<IMG_CONTEXT>"}
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(native)
    assert (image_processor.size.height, image_processor.crop_to_patches, image_processor.max_patches) == (64, True, 12)
    generation = GenerationConfig.from_pretrained(native)
    assert generation.eos_token_id == im_end

    class EndAtThirdToken(LogitsProcessor):  # the model "says" <|im_end|> as its third token
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores = torch.full_like(scores, -1e9)
                scores[:, im_end] = 0
            return scores

    model = InternVLForConditionalGeneration.from_pretrained(native, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False,
                             logits_processor=LogitsProcessorList([EndAtThirdToken()]))
    assert out.shape[1] == prompt.shape[1] + 3 and int(out[0, -1]) == im_end


def test_a_checkpoint_without_tokenizer_is_named(tmp_path, capsys):
    remote_checkpoint(tmp_path / "remote")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / "remote" / name).unlink()
    assert _converter().main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "o")]) == 2
    assert "no tokenizer in" in capsys.readouterr().err
