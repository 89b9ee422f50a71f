"""Pictures (matplotlib): IVC score maps and kept-token panels — their values, cells, marks, boxes and legend."""

import math
import random

import numpy as np
import pytest
import torch

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


def test_one_d_rope_maps_follow_the_raster_positions():
    rope = RopeSpec(100.0, 4)  # θ = 1, 0.1; LLaVA-style 1-D rotary
    maps = viz.ivc_maps(rope, 2, 3, offset=5)
    assert list(maps) == ["1-D"]
    for r in range(2):
        for c in range(3):
            p = 5 + r * 3 + c
            assert maps["1-D"]["V"][r, c].item() == pytest.approx(math.cos(p) + math.cos(0.1 * p), abs=1e-12)
            assert maps["1-D"]["U"][r, c].item() == pytest.approx(math.sin(p) + math.sin(0.1 * p), abs=1e-12)


def _rectangles(ax, gid):
    return [p for p in ax.patches if p.get_gid() == gid]


def test_ivc_figure_outlines_exactly_the_ivc_cells():
    maps = viz.ivc_maps(family_rope("qwen2_5_vl"), 6, 8, offset=20, ivc_ratio=0.1)
    fig = viz.render_ivc_maps(maps, "title")
    maps_axes = [ax for ax in fig.axes if ax.get_images()]
    assert len(maps_axes) == 4  # reference V, U; sectioned V, U
    for ax, (mode, name) in zip(maps_axes, [(m, n) for m in maps for n in ("V", "U")]):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), maps[mode][name].numpy())
        outlined = {int(p.get_y()) * 8 + int(p.get_x()) for p in _rectangles(ax, "ivc")}
        assert outlined == set(maps[mode]["ivc"].tolist())
        assert ax.get_xlabel() == "column (tokens)" and ax.get_ylabel() == "row (tokens)"
    assert fig.legends and "IVC token" in fig.legends[0].get_texts()[0].get_text()


def test_pruned_cells_are_grey_and_darker_than_a_light_background():
    light = np.full((2, 2, 3), 235, dtype=np.uint8)
    grey = viz.grey_out(light)
    assert (grey[..., 0] == grey[..., 2]).all() and grey.max() < 150


def test_kept_panels_cells_marks_and_legend():
    model, processor = get_model("qwen2_5_vl")
    image = make_image(224, 168, seed=9)
    methods = ["vanilla", "fastv", "ivc_prune", "random"]
    view, panels = viz.kept_panels(model, processor, image, methods, prompt="Where is it?")
    assert (view.grid_h, view.grid_w, view.cell) == (6, 8, 28)
    assert [p.title.split(":")[0] for p in panels] == methods  # the order asked
    assert [len(p.kept) for p in panels] == [48, 24, 24, 24]
    assert set(panels[2].marks) == {"ivc", "seed"}
    fig = viz.render_kept(view, panels, columns=3)
    shown = [ax for ax in fig.axes if ax.get_images()]
    assert len(fig.axes) == 6 and len(shown) == 4  # a 2 x 3 grid, two cells left empty
    for ax, panel in zip(shown, panels):
        drawn = np.asarray(ax.get_images()[0].get_array())
        np.testing.assert_array_equal(drawn, viz.overlay(view.image, panel, view.cell))
        kept = set(panel.kept.tolist())
        for j in range(48):
            r, c = divmod(j, 8)
            cell = drawn[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
            source = view.image[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
            if j in kept:
                assert np.array_equal(cell, source), j
            else:
                assert (cell[..., 0] == cell[..., 1]).all() and (cell[..., 1] == cell[..., 2]).all(), j
        for name, cells in panel.marks.items():
            scatter = next(c for c in ax.collections if c.get_gid() == f"mark:{name}")
            centres = {(int(x - 0.5), int(y - 0.5)) for x, y in scatter.get_offsets()}
            assert centres == {(j % 8, j // 8) for j in cells.tolist()}
        assert ax.get_xlabel() == "column (tokens)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["pruned (greyed)", "kept (as seen)", "IVC token", "foreground seed"]


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen3_vl"])
def test_kept_panels_of_every_family_show_one_segment_on_its_grid(family):
    model, processor = get_model(family)
    view, panels = viz.kept_panels(model, processor, make_image(224, 168), ["ivc_prune"], prompt="Where?")
    import ivcp
    from ivcp.testing import make_inputs

    with torch.no_grad(), ivcp.prune(model, "ivc_prune") as session:
        model(**make_inputs(processor, "Where?", images=[make_image(224, 168)]))
    start, end = session.last.segments[-1 if family == "internvl" else 0]
    assert view.grid_h * view.grid_w == end - start
    assert view.image.shape == (view.grid_h * view.cell, view.grid_w * view.cell, 3)
    kept = session.last.kept
    assert panels[0].kept.tolist() == (kept[(kept >= start) & (kept < end)] - start).tolist()


def test_grounder_panels_show_the_expression_and_the_predicted_box():
    from ivcp.data.grounding import make_sample
    from ivcp.eval.grounding import iou
    from ivcp.testing import tiny_grounder

    model, processor = tiny_grounder()
    sample = make_sample(random.Random(3))  # "the green circle"
    fig = viz.kept_figure(model, processor, sample["image"], ["vanilla", "fastv"], expression=sample["expression"],
                          target=sample["box"])
    assert sample["expression"] in fig._suptitle.get_text()
    axes = [ax for ax in fig.axes if ax.get_images()]
    cells = 224 / 8  # the 224-px picture is an 8 x 8 grid of 28-px tokens
    truth = tuple(v / cells for v in sample["box"])
    vanilla_box = _rectangles(axes[0], "predicted box")[0]
    x, y, w, h = vanilla_box.get_x(), vanilla_box.get_y(), vanilla_box.get_width(), vanilla_box.get_height()
    assert iou((x, y, x + w, y + h), truth) >= 0.5  # the unpruned grounder finds it
    assert '"bbox_2d"' in axes[0].get_title()
    for ax in axes:
        dashed = _rectangles(ax, "true box")[0]
        assert (dashed.get_x(), dashed.get_y()) == pytest.approx(truth[:2])
    assert {"predicted box", "true box"} <= {t.get_text() for t in fig.legends[0].get_texts()}


def test_cli_viz_writes_pngs(tmp_path):
    from PIL import Image

    assert main(["viz", "ivc", "--model", "llava", "--grid", "4", "6", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "ivc_maps_llava_4x6.png").size[0] > 300
    image = tmp_path / "picture.png"
    make_image(112, 84).save(image)
    assert main(["viz", "kept", "--model", "tiny:internvl", "--image", str(image), "--methods", "ivc_prune,fastv",
                 "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "kept_picture.png").size[0] > 300


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
    assert main(["viz", "kept", "--image", str(image), "--out", str(tmp_path)]) == 2
    assert "needs --expression" in capsys.readouterr().err
    assert main(["viz", "ivc", "--model", "llava_next", "--out", str(tmp_path)]) == 2
    assert "unknown model 'llava_next'" in capsys.readouterr().err
