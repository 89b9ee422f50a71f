"""DeepSeek-VL2: the native model against a hand-written forward of the released (remote-code) layout, the
tiling rule against the released processor's, the token layout, generation; the adapter's segments and every
method's pruned decode against the masked no-cache oracle (MLA decoder, alone and in a batch of 3)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from ivcp.models.deepseek_vl2 import (DeepseekVL2ForConditionalGeneration, candidate_resolutions, select_resolution,
                                      state_dict_from_remote)
from ivcp.testing import deepseek_vl2 as tiny
from ivcp.testing import make_batch_inputs, make_image, make_inputs


# --- a forward written from the released code's description, on the remote-layout weights ---------------------
def _layer_norm(x, w, b, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _reference_vision(sd, pixels, cfg):
    """timm's SigLIP ViT: conv patches + pos_embed, pre-norm blocks (fused qkv, tanh GELU), final norm."""
    v = cfg.vision_config
    x = F.conv2d(pixels, sd["vision.patch_embed.proj.weight"], sd["vision.patch_embed.proj.bias"], stride=v.patch_size)
    x = x.flatten(2).transpose(1, 2) + sd["vision.pos_embed"]
    heads = v.num_attention_heads
    for i in range(v.num_hidden_layers):
        p = f"vision.blocks.{i}."
        y = _layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        b, n, _ = qkv.shape
        q, k, val = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ val
        x = x + F.linear(att.transpose(1, 2).reshape(b, n, -1), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        x = x + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return _layer_norm(x, sd["vision.norm.weight"], sd["vision.norm.bias"])


def _reference_projector(sd, feats):
    """Pad the patch grid to even sides, each 2 × 2 cell as [c0(0,0), c0(0,1), c0(1,0), c0(1,1), c1(0,0), …]."""
    t, n, c = feats.shape
    side = math.isqrt(n)
    even = side + side % 2
    grid = torch.zeros(t, even, even, c)
    grid[:, :side, :side] = feats.view(t, side, side, c)
    cells = []
    for r in range(0, even, 2):
        for col in range(0, even, 2):
            block = grid[:, r:r + 2, col:col + 2]  # (t, 2, 2, c)
            cells.append(block.permute(0, 3, 1, 2).reshape(t, c * 4))
    x = torch.stack(cells, 1)
    x = F.linear(x, sd["projector.layers.0.weight"], sd["projector.layers.0.bias"])
    return F.linear(F.gelu(x), sd["projector.layers.2.weight"], sd["projector.layers.2.bias"])


def _reference_image_sequence(sd, tiles, rows, cols, side):
    """Global view row by row with a newline after each, the separator, then every mosaic row (tile row
    by tile row, the tiles of a row left to right) with a newline after each."""
    newline, sep = sd["image_newline"], sd["view_seperator"]
    out = []
    for r in range(side):
        out += [tiles[0, r * side + c] for c in range(side)] + [newline]
    out.append(sep)
    for tile_row in range(rows):
        for r in range(side):
            for tile_col in range(cols):
                tile = tiles[1 + tile_row * cols + tile_col]
                out += [tile[r * side + c] for c in range(side)]
            out.append(newline)
    return torch.stack(out)


def _rope_remote(x, pos, theta, interleaved=True):
    """The remote code's rotary: (MLA) de-interleave the pairs, then x·cos + rotate_half(x)·sin; (Llama attention,
    ``interleaved=False``) x·cos + rotate_half(x)·sin directly."""
    d = x.shape[-1]
    if interleaved:
        x = x.view(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = pos[:, None].float() * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * emb.cos() + rotated * emb.sin()


def _reference_language(sd, embeds, cfg):
    """DeepseekV2 with MLA (or, ``use_mla`` false, Llama's grouped multi-head attention) and MoE (softmax gate,
    greedy top-k, no renormalisation), causal, one sequence."""
    t = cfg.text_config
    h, nope, rope, vd = t.num_attention_heads, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim
    theta = t.rope_parameters["rope_theta"]
    x = embeds
    n = x.shape[0]
    pos = torch.arange(n)
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(t.num_hidden_layers):
        p = f"language.model.layers.{i}."
        y = _rms(x, sd[p + "input_layernorm.weight"])
        if not cfg.use_mla:
            hd, kvh = t.hidden_size // h, t.num_key_value_heads
            q = F.linear(y, sd[p + "self_attn.q_proj.weight"]).view(n, h, hd).transpose(0, 1)
            k = F.linear(y, sd[p + "self_attn.k_proj.weight"]).view(n, kvh, hd).transpose(0, 1)
            val = F.linear(y, sd[p + "self_attn.v_proj.weight"]).view(n, kvh, hd).transpose(0, 1)
            q, k = _rope_remote(q, pos, theta, False), _rope_remote(k, pos, theta, False)
            k, val = k.repeat_interleave(h // kvh, 0), val.repeat_interleave(h // kvh, 0)
            att = ((q @ k.transpose(-1, -2)) * hd ** -0.5 + causal).softmax(-1) @ val
            x = x + F.linear(att.transpose(0, 1).reshape(n, -1), sd[p + "self_attn.o_proj.weight"])
            y = _rms(x, sd[p + "post_attention_layernorm.weight"])
            x = x + _reference_mlp(sd, y, i, cfg)
            continue
        q = F.linear(y, sd[p + "self_attn.q_proj.weight"]).view(n, h, nope + rope).transpose(0, 1)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        ckv = F.linear(y, sd[p + "self_attn.kv_a_proj_with_mqa.weight"])
        latent, k_pe = ckv[:, : t.kv_lora_rank], ckv[:, t.kv_lora_rank:]
        kv = F.linear(_rms(latent, sd[p + "self_attn.kv_a_layernorm.weight"]), sd[p + "self_attn.kv_b_proj.weight"])
        kv = kv.view(n, h, nope + vd).transpose(0, 1)
        k_nope, values = kv[..., :nope], kv[..., nope:]
        q_pe, k_pe = _rope_remote(q_pe, pos, theta), _rope_remote(k_pe[None], pos, theta).expand(h, n, rope)
        qs, ks = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)
        att = ((qs @ ks.transpose(-1, -2)) * (nope + rope) ** -0.5 + causal).softmax(-1) @ values
        x = x + F.linear(att.transpose(0, 1).reshape(n, -1), sd[p + "self_attn.o_proj.weight"])
        y = _rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + _reference_mlp(sd, y, i, cfg)
    return F.linear(_rms(x, sd["language.model.norm.weight"]), sd["language.lm_head.weight"])


def _reference_mlp(sd, y, i, cfg):
    """Layer i's feed-forward: dense SwiGLU before first_k_dense_replace, else softmax-routed experts + shared."""
    t, p = cfg.text_config, f"language.model.layers.{i}."

    def mlp(z, prefix):
        gate = F.silu(F.linear(z, sd[prefix + "gate_proj.weight"]))
        return F.linear(gate * F.linear(z, sd[prefix + "up_proj.weight"]), sd[prefix + "down_proj.weight"])

    if i < t.first_k_dense_replace:
        return mlp(y, p + "mlp.")
    scores = F.linear(y, sd[p + "mlp.gate.weight"]).softmax(-1)
    weight, chosen = scores.topk(t.num_experts_per_tok, -1)
    routed = torch.zeros_like(y)
    for tok in range(y.shape[0]):
        for w, e in zip(weight[tok], chosen[tok]):
            routed[tok] += w * t.routed_scaling_factor * mlp(y[tok], f"{p}mlp.experts.{int(e)}.")
    return routed + mlp(y, p + "mlp.shared_experts.")


def reference_logits(sd, cfg, input_ids, pixel_values, image_tiles):
    """Logits of one prompt (1, S) by the hand-written forward."""
    embeds = sd["language.model.embed_tokens.weight"][input_ids[0]].clone()
    tiles = _reference_projector(sd, _reference_vision(sd, pixel_values, cfg))
    side, cursor, sequence = cfg.tokens_per_side, 0, []
    for rows, cols in image_tiles.tolist():
        sequence.append(_reference_image_sequence(sd, tiles[cursor: cursor + 1 + rows * cols], rows, cols, side))
        cursor += 1 + rows * cols
    embeds[input_ids[0] == cfg.image_token_id] = torch.cat(sequence)
    return _reference_language(sd, embeds, cfg)


def converted_model(seed=0, attn="sdpa", family="deepseek_vl2"):
    cfg = tiny.tiny_config(family, attn_implementation=attn)
    remote = tiny.remote_state_dict(cfg, seed)
    model = DeepseekVL2ForConditionalGeneration(cfg)
    missing, unexpected = model.load_state_dict(state_dict_from_remote(remote, cfg), strict=True)
    assert not missing and not unexpected
    return model.eval(), remote, cfg


@pytest.mark.parametrize("family", ["deepseek_vl2", "deepseek_vl2_mha"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_native_model_equals_the_remote_layout_forward(attn, family):
    """Vision → projector → newline / separator layout → MLA (or multi-head) + MoE decoder: the native model (weights
    converted from the remote layout) gives the hand-written forward's logits, for a tiled image and one more."""
    model, remote, cfg = converted_model(attn=attn, family=family)
    processor = tiny.tiny_processor()
    inputs = make_inputs(processor, "What is in the two pictures?", images=[make_image(90, 40), make_image(30, 50, seed=3)])
    assert inputs["image_tiles"].tolist() == [[2, 3], [2, 1]]  # 90 x 40 on a 105 x 70 canvas
    with torch.no_grad():
        ours = model(**inputs).logits[0]
        expected = reference_logits(remote, cfg, inputs["input_ids"], inputs["pixel_values"], inputs["image_tiles"])
    assert (ours - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def _released_rule(width, height, resolutions):
    """The released processor's select_best_resolution, restated."""
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in resolutions:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def test_tile_grids_and_token_counts_follow_the_released_rule():
    """For many image sizes: the canvas equals the released rule's (384-px tiles, their 23 grids), its tiles
    number cols · rows ≤ 9, and the image's token count is 14·15 + 1 + rows·14·(cols·14 + 1)."""
    released = [[384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
                [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688],
                [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384],
                [1152, 1152]]
    assert candidate_resolutions(384) == released
    cfg = tiny.tiny_config()
    rng = random.Random(0)
    sizes = [(rng.randint(10, 4000), rng.randint(10, 4000)) for _ in range(400)] + [(384, 384), (640, 480), (1, 5000)]
    for width, height in sizes:
        w, h = select_resolution(width, height, released)
        assert (w, h) == _released_rule(width, height, released)
        assert (w // 384) * (h // 384) <= 9
    # token counts of the real geometry (27 patches → 14 tokens a side)
    from ivcp.models.deepseek_vl2 import DeepseekVL2Config
    real = DeepseekVL2Config(image_token_id=0)
    assert real.tokens_per_side == 14 and real.image_token_count(1, 1) == 14 * 15 + 1 + 14 * 15
    assert real.image_token_count(2, 3) == 210 + 1 + 28 * 43
    # the tiny processor writes exactly that many image tokens and tiles, per image
    processor = tiny.tiny_processor()
    for width, height in [(90, 40), (35, 35), (20, 300), (200, 120), (36, 71)]:
        inputs = processor(text="<image>", images=[make_image(width, height)])
        rows, cols = inputs["image_tiles"][0].tolist()
        expect_w, expect_h = _released_rule(width, height, candidate_resolutions(tiny.TILE))
        assert (rows, cols) == (expect_h // tiny.TILE, expect_w // tiny.TILE)
        assert inputs["pixel_values"].shape[0] == 1 + rows * cols
        n = int((inputs["input_ids"] == cfg.image_token_id).sum())
        assert n == 3 * 4 + 1 + rows * 3 * (cols * 3 + 1)
    # more than two images in a prompt: no tiling
    inputs = processor(text="<image><image><image>", images=[make_image(200, 120, seed=i) for i in range(3)])
    assert inputs["image_tiles"].tolist() == [[1, 1]] * 3 and inputs["pixel_values"].shape[0] == 6


def test_chat_format_is_the_released_template():
    processor = tiny.tiny_processor()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}])
    assert text == "<|User|>: <image>\nHi?\n\n<|Assistant|>:"
    ids = processor(text=text, images=[make_image(35, 35)])["input_ids"][0]
    assert int(ids[0]) == processor.tokenizer.convert_tokens_to_ids(tiny.BOS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_greedy_without_cache_and_batches(attn):
    """generate() (KV cache) picks the tokens a no-cache greedy loop picks; a left-padded batch of two gives
    each row's own tokens."""
    model, processor = tiny.tiny_model(attn_implementation=attn)
    rows = [dict(prompt="Describe.", images=[make_image(90, 40)]), dict(prompt="What is it?", images=[make_image(40, 60, seed=1)])]
    singles = []
    for row in rows:
        inputs = make_inputs(processor, **row)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        ids = inputs["input_ids"]
        with torch.no_grad():
            for _ in range(4):
                logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}, use_cache=False).logits[:, -1]
                logits[:, model.generation_config.suppress_tokens] = float("-inf")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        expected = ids[0, -4:].tolist()
        eos = processor.tokenizer.eos_token_id
        expected = expected[: expected.index(eos) + 1] if eos in expected else expected
        assert out.tolist() == expected
        singles.append(out.tolist())
    batch = make_batch_inputs(processor, rows)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
    pad = processor.tokenizer.pad_token_id
    assert [[t for t in row if t != pad][: len(single)] for row, single in zip(out.tolist(), singles)] == singles


def test_save_and_load_round_trip(tmp_path):
    model, processor = tiny.tiny_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = DeepseekVL2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    from ivcp.models.deepseek_vl2_processor import DeepseekVL2Processor
    again = DeepseekVL2Processor.from_pretrained(tmp_path)
    inputs = make_inputs(again, "Describe.", images=[make_image(90, 40)])
    assert inputs["input_ids"].tolist() == make_inputs(processor, "Describe.", images=[make_image(90, 40)])["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


# --- the adapter: segments, and every method's pruned decode against the oracle ----------------------------------
import ivcp  # noqa: E402
from ivcp.adapters import adapter_for  # noqa: E402

from conftest import get_model  # noqa: E402
from test_batch import check_rows_like_alone  # noqa: E402
from test_families import METHODS, _decode_like_the_oracle  # noqa: E402


def test_global_view_and_tiles_are_segments_of_one_unit_and_markup_is_kept():
    """A 90 x 40 picture (2 x 3 tiles) and a 30 x 50 one (2 x 1), 3 x 3 tokens a tile: per image the global view
    (3 x 3, rows 4 apart: a newline after each) and each tile (3 x 3, rows cols·3 + 1 apart in the mosaic),
    row-major; newlines and the separator lie outside every segment and survive pruning; the layouts recovered
    without image_tiles are the same when the count is unambiguous."""
    model, processor = get_model("deepseek_vl2")
    inputs = make_inputs(processor, "Compare.", images=[make_image(90, 40), make_image(30, 50, seed=3)])
    adapter = adapter_for(model)
    ids = inputs["input_ids"][0]
    segments = adapter.segments(ids, image_sizes=inputs["image_tiles"])
    image = (ids == model.config.image_token_id).nonzero().flatten()
    first = int(image[0])

    def grid(start, stride):  # a 3 x 3 tile's input indices, row-major
        return [start + r * stride + c for r in range(3) for c in range(3)]

    expected = [grid(first, 4)]  # the global view: 3 rows of 3 tokens + newline
    local = first + 12 + 1  # after 3 x 4 global positions and the separator
    expected += [grid(local + (t // 3) * 3 * 10 + (t % 3) * 3, 10) for t in range(6)]  # mosaic rows: 9 + newline
    second = local + 6 * 10 + 1  # the template's "\n" after the first image
    local2 = second + 13
    expected += [grid(second, 4)] + [grid(local2 + t * 3 * 4, 4) for t in range(2)]  # 2 x 1 tiles: rows of 3 + 1
    assert [s.indices().tolist() for s in segments] == expected
    assert [s.n for s in segments] == [9] * 10 and all(s.end == s.indices()[-1] + 1 for s in segments)
    assert [s.source for s in segments] == [0] * 7 + [1] * 3 and [s.part for s in segments[:7]] == list(range(7))
    assert [s.thumbnail for s in segments] == [True] + [False] * 6 + [True, False, False]
    # with the originals' sizes, the global views' letterbox: 90 x 40 scaled to 35 x 15 at row 10 leaves the third
    # row of 14-px cells (28 … 42) blank; 30 x 50 to 21 x 35 at column 7, the third column
    sized = adapter.segments(ids, image_sizes=adapter.layout_inputs(inputs))
    assert [s.padding_cells for s in sized if s.thumbnail] == [(6, 7, 8), (2, 5, 8)]
    assert [s.padding_cells for s in segments] == [()] * 10
    assert len(image) == local2 + 6 * 4 - first - 1
    markup = sorted(set(image.tolist()) - {t for s in segments for t in s.indices().tolist()})
    assert len(markup) == 2 * (3 + 1 + 6)
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.25) as session:
        model(**inputs)
    kept = set(session.last.kept.tolist())
    assert set(markup) <= kept
    visual = {t for s in segments for t in s.indices().tolist()}
    assert 0 < len(kept & visual) < len(visual) // 2
    # without image_tiles: an ambiguous token count is refused (3 x 3-token tiles: 2 x 3 and 3 x 2 ... coincide);
    # with the released geometry (14 x 14 tokens a tile) every layout has its own count
    single = make_inputs(processor, "Describe.", images=[make_image(90, 40)])
    with pytest.raises(ValueError, match="pass image_tiles"):
        adapter.segments(single["input_ids"][0])
    from types import SimpleNamespace
    from ivcp.adapters.deepseek_vl2 import DeepseekVL2Adapter
    from ivcp.models.deepseek_vl2 import DeepseekVL2Config
    real = DeepseekVL2Adapter(SimpleNamespace(config=DeepseekVL2Config(image_token_id=0)))
    for w, h in candidate_resolutions(384):
        assert real._infer_layout(real.model.config.image_token_count(h // 384, w // 384), 0) == (h // 384, w // 384)


def test_mla_keys_values_and_rotary_are_the_models():
    """The adapter's q / k (rotary applied) reproduce the layer's eager attention probabilities, its v
    reproduces the attention output before o_proj: so IVC-Prune's values are the model's (from kv_b_proj)."""
    model, processor = get_model("deepseek_vl2", "eager")
    adapter = adapter_for(model)
    inputs = make_inputs(processor, "Where?", images=[make_image(40, 40)])
    layer = adapter.layers[1]
    attention = adapter.attention(layer)
    seen = {}

    def grab(module, args, kwargs, out):
        seen["hidden"], seen["pe"], seen["probs"] = kwargs["hidden_states"], kwargs["position_embeddings"], out[1]

    handle = attention.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    cos, sin = adapter.split_position_embeddings(seen["pe"])
    with torch.no_grad():
        q = adapter.rotate(adapter.project_heads(attention, "q", seen["hidden"]), cos, sin)
        k = adapter.rotate(adapter.project_heads(attention, "k", seen["hidden"]), cos, sin)
        v = adapter.project_heads(attention, "v", seen["hidden"])
    n = q.shape[2]
    logits = (q @ k.transpose(-1, -2)) * adapter.attention_scale(layer)
    probs = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, seen["probs"], atol=1e-5, rtol=0)
    assert v.shape[-1] == model.config.text_config.v_head_dim
    assert adapter.rope.head_dim == model.config.text_config.qk_rope_head_dim
    assert torch.equal(adapter.join_position_embeddings((cos, sin)), seen["pe"])


@pytest.mark.parametrize("family", ["deepseek_vl2", "deepseek_vl2_mha"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_the_oracle(method, attn, family):
    """A 90 x 40 picture (6 local tiles + the global view) on the MLA and the multi-head decoder, the family's
    defaults."""
    model, processor = get_model(family, attn)
    inputs = make_inputs(processor, "Where is the largest shape? Answer briefly.", images=[make_image(90, 40, seed=4)])
    _decode_like_the_oracle(model, inputs, method, {})


def test_renumbered_positions_match_the_oracle():
    """PDrop's renumbering recomputes DeepseekV2's complex rotary for the kept tokens."""
    model, processor = get_model("deepseek_vl2")
    inputs = make_inputs(processor, "Where is the largest shape? Answer briefly.", images=[make_image(90, 40, seed=4)])
    _decode_like_the_oracle(model, inputs, "pdrop", {"position_policy": "renumber"})


@pytest.mark.parametrize("family,method", [("deepseek_vl2", m) for m in METHODS] +
                         [("deepseek_vl2_mha", m) for m in ("ivc_prune", "fastv", "pdrop", "vscan")])
def test_every_method_prunes_each_row_of_a_batch_as_alone(family, method):
    """A tiled picture, a prompt without images, two pictures (each tiled): each row as alone and as the oracle."""
    model, processor = get_model(family)
    rows = [dict(prompt="Where is the largest shape? Answer briefly.", images=[make_image(90, 40, seed=4)]),
            dict(prompt="Say hello."),
            dict(prompt="Compare the two small pictures.", images=[make_image(30, 50, seed=7), make_image(50, 35, seed=8)])]
    check_rows_like_alone(model, processor, rows, method)


# --- the analytic counts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["deepseek_vl2", "deepseek_vl2_mha"])
def test_analytic_kv_bytes_are_what_the_cache_holds(family):
    """transformers' DeepseekV2 caches per layer and token the normed latent (kv_lora_rank 16) and the shared rotary
    key (8): 24 values, not K and V per head (2 · 4 · 16 = 128); the multi-head decoder (Tiny) caches K and V of its 2
    KV heads of 16 (64). The analytic count equals the bytes of the cache, unpruned and pruned (layer by layer)."""
    from ivcp import analytic
    from ivcp.compat import output_cache

    model, processor = get_model(family)
    inputs = make_inputs(processor, "Where?", images=[make_image(90, 40)])
    arch = analytic.TextArch.from_config(model.config)
    assert arch.cache_values_per_token == (16 + 8 if family == "deepseek_vl2" else 2 * 2 * 16)

    def measured(cache):
        return [int(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size())
                for l in cache.layers]

    with torch.no_grad():
        full = measured(output_cache(model(**inputs, use_cache=True)))
        with ivcp.prune(model, "fastv", keep_ratio=0.25) as session:  # layers 0, 1 keep every token
            pruned = measured(output_cache(model(**inputs, use_cache=True)))
    n = inputs["input_ids"].shape[1]
    assert sum(full) == analytic.kv_bytes(arch, [n] * arch.layers, 4)
    lengths = session.last.kv_lengths
    assert len(set(lengths)) > 1 and sum(pruned) == analytic.kv_bytes(arch, lengths, 4)
    assert pruned == [analytic.kv_bytes(arch, [c], 4) for c in lengths]


def test_analytic_mla_flops_count_the_latent_expansion():
    """MLA's FLOPs by hand for a toy shape (hidden 4, 2 heads, latent 3, q rank 0, nope 2, rope 1, v 2, MLP 5,
    vocab 10): projections 2·(4·2·3 + 4·(3 + 1) + 2·2·4 + 3·4·5) = 232 a token, expansion 2·3·2·(2 + 2) = 48 an
    entry, attention 2·2·(2 + 1 + 2) = 20 a pair; decoding re-expands every cached entry."""
    from ivcp import analytic

    toy = analytic.TextArch(hidden=4, intermediate=5, layers=1, heads=2, kv_heads=2, head_dim=3, vocab=10,
                            kv_lora_rank=3, qk_nope_dim=2, qk_rope_dim=1, v_head_dim=2)
    assert (toy.linear_per_token, toy.expansion_per_entry, toy.attention_per_pair) == (232, 48, 20)
    assert analytic.llm_prefill_flops(toy, [3]) == 3 * (232 + 48) + 20 * 6 + 80
    assert analytic.llm_decode_flops(toy, [4]) == 232 + (20 + 48) * 4 + 80
    assert analytic.kv_bytes(toy, [5], 2) == (3 + 1) * 2 * 5
    assert toy.weight_count == (232 + 48) // 2 + 40
    with_q = analytic.TextArch(4, 5, 1, 2, 2, 3, 10, kv_lora_rank=3, q_lora_rank=2, qk_nope_dim=2, qk_rope_dim=1,
                               v_head_dim=2)
    assert with_q.linear_per_token == 232 - 2 * 4 * 2 * 3 + 2 * (4 * 2 + 2 * 2 * 3)


# --- the benchmark ------------------------------------------------------------------------------------------------
def test_bench_architecture_and_synthetic_inputs():
    """deepseek_vl2_small builds on the meta device with DeepSeek-VL2-Small's published 16.1 B parameters; the
    synthetic inputs follow the released tiling (a 480 x 640 picture: 2 x 2 tiles, 14·15 + 1 + 28·29 tokens) and
    the tiny model runs through the benchmark."""
    from ivcp import bench

    model = bench.random_model("deepseek_vl2_small", device="meta", dtype=torch.bfloat16)
    assert 16.0e9 < sum(p.numel() for p in model.parameters()) < 16.25e9
    adapter = adapter_for(model)
    inputs = adapter.synthetic_inputs((480, 640), torch.arange(40, 50), torch.arange(60, 70), torch.Generator())
    assert inputs["image_tiles"].tolist() == [[2, 2]] and tuple(inputs["pixel_values"].shape) == (5, 3, 384, 384)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 14 * 15 + 1 + 28 * 29
    tiny_model_, _ = get_model("deepseek_vl2")
    cases = bench.run(tiny_model_, bench.plan(["vanilla", "ivc_prune"], None, [(40, 90)]), repeats=1, warmup=0,
                      new_tokens=2, log=lambda *_: None)
    rows = bench.summarise(tiny_model_, cases)
    assert [r["label"] for r in rows][:2] == ["vanilla", "ivc_prune"]
    assert all(r["kv_bytes"] == r["kv_bytes_analytic"] for r in rows)  # MLA's latent cache, counted
