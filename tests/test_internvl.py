"""InternVL: the dynamic tiling recomputed from image sizes, tiles as segments of one unit, the
authors' thumbnail-to-tiles mapping by hand. (Exact decoding of every method: tests/test_families.py.)"""

import random

import pytest
import torch

import ivcp
from ivcp.adapters import Segment, adapter_for
from ivcp.adapters.internvl import tile_grid
from ivcp.methods.ivc_prune import map_to_tiles
from ivcp.testing import make_image, make_inputs

from conftest import get_model


def test_tile_grid_recomputes_the_processors_tiles():
    """For many image sizes: the tile count of our rule equals what the image processor produces, and
    the layout recovered from (size, tile count) is the one the rule chose."""
    from transformers import GotOcr2ImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                         max_patches=6)
    rng = random.Random(0)
    sizes = [(rng.randint(20, 3000), rng.randint(20, 3000)) for _ in range(300)] + [(448, 448), (448, 896), (100, 600)]
    for height, width in sizes:
        cols, rows = tile_grid(height, width, 1, 6)
        assert (cols, rows) == tuple(get_optimal_tiled_canvas((height, width), (448, 448), 1, 6))
        expected = processor.get_number_of_image_patches(height, width, {"crop_to_patches": True, "max_patches": 6})
        assert cols * rows + (cols * rows > 1) == expected, (height, width)
        if cols * rows > 1:
            assert tile_grid(height, width, tiles=cols * rows) == (cols, rows)
    # the tokens the tiny processor writes agree: a 200 x 90 picture is 2 x 1 tiles + the thumbnail
    _, tiny = get_model("internvl")
    inputs = tiny(text="<IMG_CONTEXT>", images=[make_image(200, 90)])
    assert int((inputs["input_ids"] == tiny.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum()) == 3 * 16


def test_tiles_are_segments_of_one_unit():
    model, processor = get_model("internvl")
    inputs = make_inputs(processor, "Compare.", images=[make_image(200, 90), make_image(64, 64, seed=2)])
    adapter = adapter_for(model)
    segments = adapter.segments(inputs["input_ids"][0], image_sizes=inputs["image_sizes"])
    assert [(s.source, s.part, s.parts, s.thumbnail, s.layout, s.n) for s in segments] == [
        (0, 0, 3, False, (1, 2), 16), (0, 1, 3, False, (1, 2), 16), (0, 2, 3, True, (1, 2), 16),
        (1, 0, 1, False, None, 16)]  # the second picture is a single tile: no thumbnail
    assert segments[1].start == segments[0].end  # a tiled image's tokens are one run
    no_sizes = adapter.segments(inputs["input_ids"][0])
    assert [s.layout for s in no_sizes] == [None] * 4 and [s.n for s in no_sizes] == [16] * 4
    with torch.no_grad(), ivcp.prune(model, "ivc_prune", keep_ratio=0.5) as session:
        model(**inputs)
    kept = session.last.kept
    # the budget is per image: 24 of the first picture's 48 tokens, 8 of the second's 16
    assert int(((kept >= segments[0].start) & (kept < segments[2].end)).sum()) == 24
    assert int(((kept >= segments[3].start) & (kept < segments[3].end)).sum()) == 8


def test_thumbnail_cells_map_onto_the_tiles_by_hand():
    # two tiles side by side (1 row x 2 cols) of 4 x 4 tokens, the thumbnail after them
    tiles = [Segment(10, 26, 4, 4, part=0, parts=3, layout=(1, 2)), Segment(26, 42, 4, 4, part=1, parts=3, layout=(1, 2))]
    thumbnail = Segment(42, 58, 4, 4, part=2, parts=3, thumbnail=True, layout=(1, 2))
    # thumbnail cell (1, 3) covers mosaic row 1, columns 6 and 7: tile 1, cells (1, 2) and (1, 3) -> local 6, 7
    assert map_to_tiles(torch.tensor([1 * 4 + 3]), thumbnail, tiles).tolist() == [26 + 6, 26 + 7]
    # cell (0, 0): mosaic (0, 0) and (0, 1): tile 0, local 0 and 1
    assert map_to_tiles(torch.tensor([0]), thumbnail, tiles).tolist() == [10, 11]
    # 2 rows x 1 col: cell (2, 1) covers mosaic rows 4, 5 (the second tile's rows 0, 1), column 1
    tall = [Segment(0, 16, 4, 4, layout=(2, 1)), Segment(16, 32, 4, 4, layout=(2, 1))]
    thumb = Segment(32, 48, 4, 4, thumbnail=True, layout=(2, 1))
    assert map_to_tiles(torch.tensor([2 * 4 + 1]), thumb, tall).tolist() == [16 + 1, 16 + 4 + 1]


def test_the_authors_mode_needs_the_layout():
    model, processor = get_model("internvl")
    inputs = make_inputs(processor, "Where?", images=[make_image(200, 90)])
    del inputs["image_sizes"]
    with ivcp.prune(model, "ivc_prune", foreground_source="thumbnail") as session, \
            pytest.raises(ValueError, match="needs the tiles' layout"):
        model(**inputs)
    assert session.last is None


def test_adapter_facts():
    model, _ = get_model("internvl_llama")
    adapter = adapter_for(model)
    assert adapter.family == "internvl" and adapter.tokens_per_tile == 16 and adapter.tile_side == 4
    assert type(adapter.text_model).__name__ == "LlamaModel"
    context = model.config.image_token_id
    assert adapter.marker_token_ids == {context, context - 1, context - 2}
