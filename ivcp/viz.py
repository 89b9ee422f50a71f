"""Pictures of what pruning keeps, drawn with matplotlib (headless, Agg).

- :func:`ivc_maps` / :func:`render_ivc_maps`: the summed cosine V(m) and sine U(m) over an image grid
  with the IVC tokens outlined (paper eq. 7-8, Fig. 1 / Fig. 4); M-RoPE in the reference and sectioned
  modes, 1-D RoPE (LLaVA, InternVL) over the raster positions.
- :func:`kept_panels` / :func:`render_kept` (:func:`kept_figure` does both): the image as the model saw
  it, once per method in a grid of panels, pruned cells darkened to grey, IVC tokens and foreground
  seeds marked, a legend, axes in token cells; with an ``expression`` (the tiny grounder) each panel also
  shows the box the model predicts under that method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .adapters.base import RopeSpec
from .scoring import IVC_MODES, ivc_scores, ivc_token_set

CELL_PX = 28  # one merged token of Qwen2-VL / Qwen2.5-VL: 2 x 2 patches of 14 px
ONE_D = "1-D"  # the mode key of a 1-D rotary's maps
MARK_STYLES = {  # how each mark a method records is drawn, and its legend label
    "ivc": dict(marker="s", color="#e61e1e", label="IVC token"),
    "seed": dict(marker="o", color="#1e78ff", label="foreground seed"),
    "pattern": dict(marker="D", color="#ffaa00", label="pattern token"),
}
PRUNED_GREY = 90  # pruned cells are pulled toward this dark grey, so they never look like a light kept background


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("ivcp.viz draws with matplotlib: pip install matplotlib (the plot extra)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# --- IVC score maps --------------------------------------------------------------------------------

def image_positions(grid_h: int, grid_w: int, offset: int, rope: RopeSpec | None = None) -> torch.Tensor:
    """Rotary ids of an image after ``offset`` tokens. M-RoPE (Qwen): (3, N) with t = offset,
    h = offset + row, w = offset + col; 1-D RoPE: (N,) = offset + the raster index."""
    if rope is not None and rope.mrope_section is None:
        return offset + torch.arange(grid_h * grid_w)
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.full_like(rows, offset), offset + rows, offset + cols])


def ivc_maps(rope: RopeSpec, grid_h: int, grid_w: int, offset: int = 0, ivc_ratio: float = 0.1,
             modes: tuple[str, ...] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per mode: V and U as (grid_h, grid_w) maps and the IVC set (row-major local indices). M-RoPE
    gives the modes ``reference`` and ``sectioned`` (or ``modes``); 1-D RoPE one map set, keyed ``1-D``."""
    pos = image_positions(grid_h, grid_w, offset, rope)
    if rope.mrope_section is None:
        modes, calls = (ONE_D,), ("reference",)
    else:
        modes = tuple(modes or IVC_MODES)
        calls = modes
    out = {}
    for key, mode in zip(modes, calls):
        v, u = ivc_scores(pos, rope, mode)
        out[key] = {"V": v.view(grid_h, grid_w), "U": u.view(grid_h, grid_w), "ivc": ivc_token_set(v, u, ivc_ratio)}
    return out


def render_ivc_maps(maps: dict[str, dict[str, torch.Tensor]], title: str = ""):
    """A matplotlib figure: a row per mode, V then U, each with its colour bar and the IVC tokens
    outlined; axes in token cells."""
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    rows = len(maps)
    grid_h, grid_w = next(iter(maps.values()))["V"].shape
    scale = 3.2 / max(grid_h, grid_w) ** 0.5 if max(grid_h, grid_w) > 24 else 0.18
    side = min(7.0, max(2.5, scale * max(grid_h, grid_w)))
    fig, axes = plt.subplots(rows, 2, figsize=(2 * side * grid_w / max(grid_h, grid_w) + 2.5, rows * side + 1.2),
                             squeeze=False, layout="constrained")
    for row, (mode, m) in enumerate(maps.items()):
        for col, name in enumerate(("V", "U")):
            ax = axes[row, col]
            shown = ax.imshow(m[name].double().numpy(), cmap="viridis", extent=(0, grid_w, grid_h, 0),
                              interpolation="nearest")
            fig.colorbar(shown, ax=ax, shrink=0.8, label=f"{name}(m)")
            for j in m["ivc"].tolist():
                r, c = divmod(j, grid_w)
                ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="white", linewidth=1.5, gid="ivc"))
            ax.set_title(f"{mode}: {name}(m) = Σ {'cos' if name == 'V' else 'sin'}(p·θ)")
            ax.set_xlabel("column (tokens)")
            ax.set_ylabel("row (tokens)")
    fig.legend(handles=[Patch(facecolor="none", edgecolor="black", label="IVC token (outlined white)")],
               loc="lower center", ncols=1, frameon=False)
    if title:
        fig.suptitle(title)
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    return fig


# --- kept-token overlays ---------------------------------------------------------------------------

@dataclass
class Panel:
    """One method's view: which cells (row-major token indices of the shown grid) were kept and marked;
    with the grounder, the answer and its box (x1, y1, x2, y2 in cells of the grid)."""

    title: str
    grid_h: int
    grid_w: int
    kept: torch.Tensor
    marks: dict[str, torch.Tensor] = field(default_factory=dict)
    answer: str | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class KeptView:
    """The picture as the model saw it (``image``: (grid_h·cell, grid_w·cell, 3) uint8) and what it is."""

    image: np.ndarray
    grid_h: int
    grid_w: int
    cell: int
    note: str = ""


def grey_out(cell_rgb: np.ndarray) -> np.ndarray:
    """A pruned cell: R = G = B, its luminance pulled toward a dark grey (so a pruned light background
    is darker than a kept one)."""
    lum = cell_rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = np.round(0.3 * lum + 0.7 * PRUNED_GREY).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(image_rgb: np.ndarray, panel: Panel, cell: int = CELL_PX) -> np.ndarray:
    """The image with pruned cells greyed; ``image_rgb`` is (H, W, 3) with H = grid_h·cell, W = grid_w·cell.
    (Marks and boxes are drawn on top by :func:`render_kept`.)"""
    if image_rgb.shape[:2] != (panel.grid_h * cell, panel.grid_w * cell):
        raise ValueError(f"image of {image_rgb.shape[1]}x{image_rgb.shape[0]} px does not match a "
                         f"{panel.grid_w}x{panel.grid_h} grid of {cell} px cells")
    out = image_rgb.copy()
    kept = torch.zeros(panel.grid_h * panel.grid_w, dtype=torch.bool)
    kept[panel.kept] = True
    for j in (~kept).nonzero().flatten().tolist():
        r, c = divmod(j, panel.grid_w)
        box = (slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
        out[box] = grey_out(out[box])
    return out


def render_kept(view: KeptView, panels: list[Panel], columns: int = 2, title: str = "",
                target: tuple[float, float, float, float] | None = None):
    """A matplotlib figure: one panel per method in a grid (``columns`` per row), in the order given;
    pruned cells grey, marks at the cell centres, the predicted box (if any) in magenta and the true box
    ``target`` (cells, if known) dashed; axes in token cells; one legend (pruned / kept / IVC token /
    seed / boxes)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    if not panels:
        raise ValueError("render_kept needs at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    aspect = view.grid_w / view.grid_h
    side = 3.6
    fig, axes = plt.subplots(rows, columns, figsize=(columns * side * max(aspect, 0.6) + 0.4, rows * (side + 0.6) + 1.2),
                             squeeze=False, layout="constrained")
    marks_seen: dict[str, None] = {}
    any_box = False
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        panel = panels[k]
        ax.imshow(overlay(view.image, panel, view.cell), extent=(0, view.grid_w, view.grid_h, 0),
                  interpolation="nearest")
        for name, cells in panel.marks.items():
            if len(cells) == 0:
                continue
            style = MARK_STYLES.get(name, dict(marker="x", color="#ff00ff", label=name))
            rows_, cols_ = np.divmod(cells.numpy(), panel.grid_w)
            ax.scatter(cols_ + 0.5, rows_ + 0.5, s=22, marker=style["marker"], c=style["color"], edgecolors="white",
                       linewidths=0.6, gid=f"mark:{name}")
            marks_seen[name] = None
        if panel.box is not None:
            x1, y1, x2, y2 = panel.box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="#d000d0", linewidth=2,
                                   gid="predicted box"))
            any_box = True
        if target is not None:
            x1, y1, x2, y2 = target
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="black", linestyle="--",
                                   linewidth=1.2, gid="true box"))
        text = panel.title if panel.answer is None else f"{panel.title}\n→ {panel.answer[:60]}"
        ax.set_title(text, fontsize=9)
        ax.set_xlim(0, view.grid_w)
        ax.set_ylim(view.grid_h, 0)
        ax.set_xlabel("column (tokens)", fontsize=8)
        ax.set_ylabel("row (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Patch(facecolor=(PRUNED_GREY / 255,) * 3, label="pruned (greyed)"),
               Patch(facecolor="white", edgecolor="black", label="kept (as seen)")]
    for name in marks_seen:
        style = MARK_STYLES.get(name, dict(marker="x", color="#ff00ff", label=name))
        handles.append(Line2D([], [], linestyle="none", marker=style["marker"], color=style["color"], label=style["label"]))
    if any_box:
        handles.append(Patch(facecolor="none", edgecolor="#d000d0", linewidth=2, label="predicted box"))
    if target is not None:
        handles.append(Patch(facecolor="none", edgecolor="black", linestyle="--", label="true box"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False, fontsize=8)
    heading = " — ".join(t for t in (title, view.note) if t)
    if heading:
        fig.suptitle(heading, fontsize=10)
    return fig


def _denormalised(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """(3, H, W) normalised pixels back to (H, W, 3) uint8 with the processor's mean and std."""
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or (0.0, 0.0, 0.0)).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", None) or (1.0, 1.0, 1.0)).view(3, 1, 1)
    rgb = (pixels.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()


def model_view(image, inputs: dict, processor, segments: list[tuple[int, int]]) -> tuple[KeptView, int]:
    """What the model saw of the first image and which of its segments that is: Qwen families — the
    image resized to the merged grid of ``image_grid_thw`` (segment 0); tile families (LLaVA, InternVL)
    — the last tile of ``pixel_values`` (LLaVA's only tile, InternVL's thumbnail: the whole picture),
    un-normalised, on a square grid of its segment's tokens."""
    from PIL import Image

    image_processor = processor.image_processor
    if "image_grid_thw" in inputs:
        merge = int(getattr(image_processor, "merge_size", 2))
        cell = int(getattr(image_processor, "patch_size", 14)) * merge
        _, grid_h, grid_w = (int(v) // m for v, m in zip(inputs["image_grid_thw"][0].tolist(), (1, merge, merge)))
        resized = image.convert("RGB").resize((grid_w * cell, grid_h * cell), Image.BICUBIC)
        return KeptView(np.asarray(resized), grid_h, grid_w, cell), 0
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.dim() != 4:
        raise ValueError("viz knows Qwen-style inputs (image_grid_thw) and tiled pixel_values (LLaVA, InternVL); "
                         f"these inputs have {sorted(inputs)}")
    tiles = pixels.shape[0]
    index = len(segments) - 1 if tiles > 1 else 0
    start, end = segments[index]
    side = int(round((end - start) ** 0.5))
    if side * side != end - start:
        raise ValueError(f"a tile of {end - start} tokens is not a square grid")
    tile = _denormalised(pixels[tiles - 1 if tiles > 1 else 0], image_processor)
    cell = tile.shape[0] // side
    note = f"thumbnail tile ({tiles - 1} tiles + thumbnail pruned alike)" if tiles > 1 else ""
    return KeptView(np.ascontiguousarray(tile[: side * cell, : side * cell]), side, side, cell, note), index


def kept_panels(model, processor, image, methods: list[str], params: dict | None = None, *,
                prompt: str = "Describe the picture.", expression: str | None = None, max_new_tokens: int = 40,
                progress: Callable | None = None) -> tuple[KeptView, list[Panel]]:
    """Run each method on one image; returns (what the model saw, a panel per method, in order).

    ``params`` maps a method name to its keyword parameters; ``vanilla`` gives an unpruned panel. With
    ``expression`` the prompt is the harness's grounding prompt for it and each method generates an
    answer, whose box is parsed into grid cells (the tiny grounder); otherwise one prefill each."""
    import ivcp

    from .eval.grounding import grounding_prompt, parse_box
    from .testing import make_inputs

    params = params or {}
    for method in methods:  # bad names fail before any compute
        if method != "vanilla":
            ivcp.resolve_method(model, method, **params.get(method, {}))
    text = grounding_prompt(expression) if expression else prompt
    inputs = make_inputs(processor, text, images=[image])
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    n_prompt = inputs["input_ids"].shape[1]
    view = index = None
    panels = []
    for method in (progress or (lambda items: items))(methods):
        name, kwargs = ("random", {"keep_ratio": 1.0}) if method == "vanilla" else (method, params.get(method, {}))
        with torch.no_grad(), ivcp.prune(model, name, **kwargs) as session:
            if expression:
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                model(**inputs)
        record = session.last
        if view is None:
            view, index = model_view(image, inputs, processor, record.segments)
        start, end = record.segments[index]
        inside = lambda idx: idx[(idx >= start) & (idx < end)] - start  # noqa: E731
        n_kept, n_all = (record.n_visual, record.n_visual) if method == "vanilla" else (record.n_visual_kept, record.n_visual)
        panel = Panel(f"{method}: {n_kept}/{n_all} kept ({n_kept / n_all:.0%})", view.grid_h, view.grid_w,
                      inside(record.kept).cpu(), {} if method == "vanilla" else
                      {k: inside(v).cpu() for k, v in record.marks.items()})
        if expression:
            panel.answer = processor.decode(out[0, n_prompt:], skip_special_tokens=True).strip()
            seen = (view.grid_w * view.cell, view.grid_h * view.cell)
            parsed = parse_box(panel.answer, "resized_pixels", image.size, seen)
            if parsed.box is not None:
                sx, sy = view.grid_w / image.size[0], view.grid_h / image.size[1]
                x1, y1, x2, y2 = parsed.box
                panel.box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        panels.append(panel)
    return view, panels


def kept_figure(model, processor, image, methods: list[str], params: dict | None = None, *,
                prompt: str = "Describe the picture.", expression: str | None = None, columns: int = 2,
                target: tuple[float, float, float, float] | None = None, progress: Callable | None = None) -> Any:
    """:func:`kept_panels` drawn by :func:`render_kept`, titled with the expression when there is one;
    ``target`` is the true box in the image's pixels, if known."""
    view, panels = kept_panels(model, processor, image, methods, params, prompt=prompt, expression=expression,
                               progress=progress)
    title = f"locate: {expression!r}" if expression else f"prompt: {prompt[:70]!r}"
    if target is not None:
        sx, sy = view.grid_w / image.size[0], view.grid_h / image.size[1]
        target = (target[0] * sx, target[1] * sy, target[2] * sx, target[3] * sy)
    return render_kept(view, panels, columns=columns, title=title, target=target)


def save(figure, out_dir: str | Path, name: str) -> Path:
    """Write a matplotlib figure (or a PIL image) as ``out_dir/name``; returns the path."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    if hasattr(figure, "savefig"):
        figure.savefig(target, dpi=110)
        _pyplot().close(figure)
    else:
        figure.save(target)
    return target
