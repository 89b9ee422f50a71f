"""IVC score maps and kept-token overlays: values, marked cells and pixels."""

import math

import numpy as np
import pytest

from ivcp import viz
from ivcp.adapters import RopeSpec
from ivcp.cli import main
from ivcp.config import family_rope
from ivcp.testing import make_image

from conftest import get_model


def test_family_rope_is_the_released_one():
    rope = family_rope("qwen2_5_vl")
    assert (rope.theta, rope.head_dim, rope.mrope_section) == (1e6, 128, (16, 24, 24))


def test_map_values_equal_the_closed_form():
    rope = RopeSpec(1000.0, 6, (1, 1, 1))  # θ = 1, 0.1, 0.01; section: t, h, w one frequency each
    maps = viz.ivc_maps(rope, 3, 4, offset=7, ivc_ratio=0.25)
    for r in range(3):
        for c in range(4):
            t, h, w = 7, 7 + r, 7 + c
            ref_v = sum(math.cos(p * th) for p in (t, h, w) for th in (1, 0.1, 0.01))
            sec_u = math.sin(t * 1) + math.sin(h * 0.1) + math.sin(w * 0.01)
            assert maps["reference"]["V"][r, c].item() == pytest.approx(ref_v, abs=1e-12)
            assert maps["sectioned"]["U"][r, c].item() == pytest.approx(sec_u, abs=1e-12)


def test_heatmap_outlines_exactly_the_ivc_cells():
    maps = viz.ivc_maps(family_rope("qwen2_5_vl"), 6, 8, offset=20, ivc_ratio=0.1)
    m = maps["reference"]
    cell = 16
    pixels = np.asarray(viz.heatmap(m["V"], m["ivc"], cell))
    outlined = {r * 8 + c for r in range(6) for c in range(8)
                if tuple(pixels[r * cell, c * cell]) == (255, 255, 255)}
    assert outlined == set(m["ivc"].tolist())
    assert 0 < len(outlined) <= 2 * round(0.1 * 48)


def _cells(array, grid_h, grid_w, cell=viz.CELL_PX):
    for r in range(grid_h):
        for c in range(grid_w):
            yield r * grid_w + c, array[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]


def test_overlay_greys_pruned_cells_and_keeps_the_rest():
    model, processor = get_model("qwen2_5_vl")
    image = make_image(224, 168, seed=9)
    methods = ["fastv", "ivc_prune", "random"]
    view, panels = viz.kept_panels(model, processor, image, "Where is it?", methods)
    canvas, boxes = viz.render_kept(view, panels)
    original = np.asarray(view)
    assert [p.title.split(":")[0] for p in panels] == methods  # the order asked
    assert [b[0] for b in boxes] == sorted(b[0] for b in boxes)
    drawn = np.asarray(canvas)
    for panel, (x0, y0, x1, y1) in zip(panels, boxes):
        shown = drawn[y0:y1, x0:x1]
        kept = set(panel.kept.tolist())
        marked = set().union(*[set(v.tolist()) for v in panel.marks.values()]) if panel.marks else set()
        assert len(kept) == round(0.5 * 48)
        differing = set()
        for j, cell in _cells(shown, panel.grid_h, panel.grid_w):
            _, source = next((k, s) for k, s in _cells(original, panel.grid_h, panel.grid_w) if k == j)
            if j in kept:
                if not np.array_equal(cell, source):
                    differing.add(j)
            else:
                assert (cell[..., 0] == cell[..., 1]).all() and (cell[..., 1] == cell[..., 2]).all(), j
        assert differing <= marked  # kept cells are untouched but for the mark dots
        assert differing == (marked & kept)
    ivc_panel = panels[1]
    assert set(ivc_panel.marks) == {"ivc", "seed"}


def test_cli_viz_writes_pngs(tmp_path):
    from PIL import Image

    assert main(["viz", "ivc", "--model", "qwen2_vl", "--grid", "4", "6", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "ivc_maps_qwen2_vl_4x6.png").size[0] > 100
    image = tmp_path / "picture.png"
    make_image(112, 84).save(image)
    assert main(["viz", "kept", "--image", str(image), "--methods", "ivc_prune,fastv", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "kept_picture.png").is_file()


def test_cli_viz_bad_arguments(tmp_path, capsys):
    image = tmp_path / "picture.png"
    make_image(112, 84).save(image)
    assert main(["viz", "kept", "--image", str(image), "--methods", "ivc_prune,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    assert main(["viz", "kept", "--image", str(broken), "--out", str(tmp_path)]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert main(["viz", "kept", "--image", str(tmp_path / "missing.jpg"), "--out", str(tmp_path)]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert main(["viz", "ivc", "--model", "llava_next", "--out", str(tmp_path)]) == 2
    assert "no rotary parameters for model family 'llava_next'" in capsys.readouterr().err
