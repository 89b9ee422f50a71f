"""The authors' DeepSeek-VL2 IVC-Prune rule ([authors.ivc_prune] of configs/models/deepseek_vl2.toml) against the
same rule worked out by hand from their code's description (FireRedTeam/IVC-Prune, modeling_deepseek.py,
IVCP_forward_flashattention) on the model's own value vectors, and its pruned decode against the masked no-cache
oracle, on the MLA and the multi-head decoder."""

import pytest
import torch

import ivcp
from ivcp.adapters import adapter_for
from ivcp.config import authors_params
from ivcp.testing import make_image, make_inputs

from conftest import get_model
from test_batch import check_rows_like_alone
from test_families import _decode_like_the_oracle

PROMPT = "Where is the largest shape? Answer briefly."


def _authors(seed_ratio=None):
    params = authors_params("deepseek_vl2", "ivc_prune")
    if seed_ratio is not None:
        params["seed_ratio"] = seed_ratio
    return params


def _layer_values(model, inputs, layer):
    """(heads, S, d) value vectors of ``layer``'s input (after its input norm), as the attention computes them."""
    adapter = adapter_for(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("h", kwargs["hidden_states"])

    handle = adapter.attention(adapter.layers[layer]).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        return adapter.project_heads(adapter.attention(adapter.layers[layer]), "v", seen["h"])[0].float()


def _top(scores, k):
    return set(torch.topk(scores, k).indices.tolist())


def authors_kept(model, inputs, selection_layer, seed_ratio):
    """The kept input indices by the authors' rule, step by step (one image, no padding)."""
    cfg = model.config
    side = cfg.tokens_per_side
    ids = inputs["input_ids"][0]
    rows, cols = inputs["image_tiles"][0].tolist()
    image = (ids == cfg.image_token_id).nonzero().flatten()
    s0, length, seq = int(image[0]), image.numel(), ids.numel()
    glob = torch.arange(s0, s0 + side * (side + 1))  # the global view with its newlines: 210 on the real model
    base, width = s0 + glob.numel() + 1, cols * side + 1  # the mosaic after the separator; a row and its newline
    # value similarity of layer K-1: text queries from the image's end + 1, softmax over the global positions
    values = _layer_values(model, inputs, selection_layer - 1)
    rows_of = lambda q: (values[:, q] @ values[:, glob].transpose(-1, -2) / values.shape[-1] ** 0.5  # noqa: E731
                         ).softmax(-1).mean(0)
    text = rows_of(torch.arange(s0 + length + 1, seq))
    # not the newline column, not a cell of pure letterbox padding (their processor: the image scaled by
    # min(S / W, S / H), sizes truncated, centred; a cell of patch · 2 px that overlaps none of it)
    height, width_px = inputs["image_sizes"][0].tolist()
    size, cell = model.config.tile_size, model.config.vision_config.patch_size * 2
    scale = min(size / width_px, size / height)
    w, h = int(width_px * scale), int(height * scale)
    left, top = (size - w) // 2, (size - h) // 2
    blank = {i * (side + 1) + j for i in range(side) for j in range(side)
             if not (max(j * cell, left) < min(j * cell + cell, left + w) and max(i * cell, top) < min(i * cell + cell, top + h))}
    cells = [i for i in range(glob.numel()) if i % (side + 1) != side and i not in blank]
    s = text.mean(0)
    seeds = [cells[i] for i in _top(s[cells], round(len(cells) * seed_ratio))]
    f = torch.cat([text, rows_of(glob[seeds])]).mean(0)
    # IVC: mean cos / sin of the rotary angles p·θ_k (1-D positions = input indices here)
    rope = adapter_for(model).rope
    theta = rope.theta ** (-torch.arange(0, rope.head_dim, 2, dtype=torch.float64) / rope.head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * theta
    cos, sin = angles.cos().mean(-1), angles.sin().mean(-1)
    k = round(glob.numel() * 0.1)
    global_ivc = _top(cos[glob], k) | _top(sin[glob], k)
    row_ivc = set()
    for r in range(rows * side):
        row = torch.arange(base + r * width, base + (r + 1) * width)
        row_ivc |= {int(row[i]) for i in _top(cos[row], round(width * 0.15)) | _top(sin[row], round(width * 0.15))}
    # the global view: IVC + the best by f (newlines excluded, IVC tokens skipped) up to half its positions
    fill = max(1, round(glob.numel() * 0.5) - len(global_ivc))
    order = [cells[i] for i in torch.argsort(f[cells], descending=True).tolist()]
    foreground = set(seeds) | set([i for i in order if i not in global_ivc][:fill])
    mapped = set()
    for cell in foreground:  # a global cell (ty, tx) covers rows ty·rows… and columns tx·cols… of the mosaic
        ty, tx = divmod(cell, side + 1)
        mapped |= {base + r * width + c for r in range(ty * rows, (ty + 1) * rows) for c in range(tx * cols, (tx + 1) * cols)}
    newlines = {int(glob[i]) for i in range(side, glob.numel(), side + 1)} | {base + r * width + width - 1
                                                                             for r in range(rows * side)}
    kept = set(range(s0)) | set(range(s0 + length, seq)) | {base - 1} | newlines | row_ivc | mapped
    kept |= {int(glob[i]) for i in global_ivc | foreground}
    return kept, dict(glob=glob, base=base, width=width, newlines=newlines, global_ivc=global_ivc,
                      foreground=foreground, row_ivc=row_ivc, mapped=mapped, blank=blank)


# each case tells some of the options apart (the kept set changes without map_seeds, with the softmax over the
# global view's tokens only, or with the letterbox cells competing); 80 x 50 and 90 x 40 leave the global view's
# bottom row pure padding
CASES = [("deepseek_vl2", (100, 70), 1), ("deepseek_vl2", (40, 60), 2), ("deepseek_vl2_mha", (40, 60), 1),
         ("deepseek_vl2_mha", (70, 48), 1), ("deepseek_vl2", (80, 50), 1), ("deepseek_vl2_mha", (90, 40), 2)]


@pytest.mark.parametrize("family,size,seed", CASES)
def test_the_authors_rule_keeps_what_their_code_keeps(family, size, seed, monkeypatch):
    """2 x 3 tiles (100 x 70, 80 x 50, 90 x 40) and 2 x 2 (40 x 60, 70 x 48): the kept set equals the rule worked out
    by hand (letterbox cells out of the seeds and the foreground ranking), the
    text queries are the tokens from the second after the image on, and the counts are the rule's — every newline
    and the separator kept, per mosaic row its 15 % IVC picks, the global view at half its positions (IVC picks on
    newlines included) plus its seed. seed_ratio 0.12: one seed on the 3 x 3 view by their round(0.12 · 9) and
    ivcp's max(1, ·) alike (their 1 % leaves none below 50 tokens)."""
    from ivcp.selection import SelectionContext

    model, processor = get_model(family)
    inputs = make_inputs(processor, PROMPT, images=[make_image(*size, seed=seed)])
    params = _authors(seed_ratio=0.12)
    queries = []
    own = SelectionContext.text_queries
    monkeypatch.setattr(SelectionContext, "text_queries",
                        lambda self, *a, **k: queries.append(own(self, *a, **k)) or queries[-1])
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", **params) as session:
        model(**inputs)
    layer = session.method.selection_layer
    expected, parts = authors_kept(model, inputs, layer, 0.12)
    kept = set(session.last.kept.tolist())
    assert kept == expected
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert [q.tolist() for q in queries] == [list(range(int(image[-1]) + 2, inputs["input_ids"].shape[1]))]
    assert parts["newlines"] <= kept and parts["base"] - 1 in kept
    glob, width, base = parts["glob"], parts["width"], parts["base"]
    side = model.config.tokens_per_side
    rows, cols = inputs["image_tiles"][0].tolist()
    global_cells = {int(glob[i]) for i in range(glob.numel()) if i % (side + 1) != side}
    ivc_cells = {int(glob[i]) for i in parts["global_ivc"]} & global_cells
    # the global view: round(0.5 · 12) = 6 positions with its IVC picks (newline picks counted), + the seed if apart
    assert 1 <= len(parts["global_ivc"]) <= 2  # round(0.1 · 12) = 1 by cos, 1 by sin
    fill = 6 - len(parts["global_ivc"])
    assert len(kept & global_cells) - len(ivc_cells) in (fill, fill + 1)
    for r in range(rows * side):  # each mosaic row: its IVC picks (round(0.15 · width)) and the mapped foreground
        row = set(range(base + r * width, base + (r + 1) * width - 1))
        picks = parts["row_ivc"] & row
        assert 1 <= len(picks) <= 2 * round(0.15 * width)
        assert kept & row == picks | (parts["mapped"] & row)
    # the foreground cells map onto rows x cols blocks of the mosaic
    assert len(parts["mapped"]) == len(parts["foreground"]) * rows * cols
    assert session.last.kv_lengths[0] == inputs["input_ids"].shape[1] > session.last.kv_lengths[1]


@pytest.mark.parametrize("family", ["deepseek_vl2", "deepseek_vl2_mha"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_authors_settings_match_the_oracle(family, attn):
    """The authors' settings as configured (layer 0 keeps its whole cache) decode like the masked no-cache oracle
    on a tiled picture (2 x 3 tiles), float32."""
    model, processor = get_model(family, attn)
    inputs = make_inputs(processor, PROMPT, images=[make_image(100, 70, seed=4)])
    session = _decode_like_the_oracle(model, inputs, "ivc_prune", _authors())
    lengths = session.last.kv_lengths
    assert lengths[0] == inputs["input_ids"].shape[1] and lengths[1] < lengths[0]


def test_the_authors_settings_batch_too():
    """A tiled picture, a text-only prompt and two pictures in one batch: each row pruned as alone."""
    model, processor = get_model("deepseek_vl2")
    rows = [dict(prompt=PROMPT, images=[make_image(100, 70, seed=4)]), dict(prompt="Say hello."),
            dict(prompt="Compare the two small pictures.", images=[make_image(30, 50, seed=7), make_image(50, 35, seed=8)])]
    check_rows_like_alone(model, processor, rows, "ivc_prune", _authors())
