"""Pictures of what pruning keeps (Pillow only, headless).

- :func:`ivc_maps` / :func:`render_ivc_maps`: the summed cosine V(m) and sine U(m) over a merged grid
  with the IVC tokens outlined (paper Fig. 1 / Fig. 4), for the reference and sectioned modes.
- :func:`kept_panels` / :func:`render_kept`: the image as the model saw it (resized to whole 28-pixel
  cells), once per method, with pruned cells greyed out and IVC tokens / seeds marked by a small dot
  in the cell centre (paper Tab. 15).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters.base import RopeSpec
from .scoring import IVC_MODES, ivc_scores, ivc_token_set

CELL_PX = 28  # one merged token of Qwen2-VL / Qwen2.5-VL: 2 x 2 patches of 14 px
MARK_COLOURS = {"ivc": (230, 30, 30), "seed": (30, 120, 255), "pattern": (255, 170, 0)}
MARK_RADIUS = 2  # marks are (2r+1) x (2r+1) squares at the cell centre


# --- IVC score maps --------------------------------------------------------------------------------

def image_positions(grid_h: int, grid_w: int, offset: int) -> torch.Tensor:
    """Qwen's M-RoPE ids of an image after ``offset`` tokens: t = offset, h = offset + row, w = offset + col."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.full_like(rows, offset), offset + rows, offset + cols])


def ivc_maps(rope: RopeSpec, grid_h: int, grid_w: int, offset: int = 0, ivc_ratio: float = 0.1,
             modes: tuple[str, ...] = IVC_MODES) -> dict[str, dict[str, torch.Tensor]]:
    """Per mode: V and U as (grid_h, grid_w) maps and the IVC set (row-major local indices)."""
    pos = image_positions(grid_h, grid_w, offset)
    out = {}
    for mode in modes:
        v, u = ivc_scores(pos, rope, mode)
        out[mode] = {"V": v.view(grid_h, grid_w), "U": u.view(grid_h, grid_w), "ivc": ivc_token_set(v, u, ivc_ratio)}
    return out


def _colormap(values: np.ndarray) -> np.ndarray:
    """Dark blue → teal → yellow, a viridis-like ramp; values scaled to their own min..max."""
    lo, hi = float(values.min()), float(values.max())
    t = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    x = t * (len(stops) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(stops) - 2)
    frac = (x - i)[..., None]
    return (stops[i] * (1 - frac) + stops[i + 1] * frac).round().astype(np.uint8)


def heatmap(values: torch.Tensor, marked: torch.Tensor, cell: int = 16):
    """A PIL heat map of a (h, w) map, ``marked`` cells outlined in white."""
    from PIL import Image, ImageDraw

    h, w = values.shape
    rgb = _colormap(values.double().numpy()).repeat(cell, 0).repeat(cell, 1)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    for j in marked.tolist():
        r, c = divmod(j, w)
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 255, 255), width=2)
    return image


def render_ivc_maps(maps: dict[str, dict[str, torch.Tensor]], title: str = "", cell: int = 16):
    """One figure: a row per mode, V then U, IVC tokens outlined."""
    from PIL import Image, ImageDraw

    tiles = [(f"{mode}: {name}", heatmap(m[name], m["ivc"], cell)) for mode, m in maps.items() for name in ("V", "U")]
    tw, th = tiles[0][1].size
    pad, label = 8, 14
    cols, rows = 2, len(maps)
    top = label + 4 if title else 0
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, top + rows * (th + label + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill="black")
    for k, (name, tile) in enumerate(tiles):
        x, y = pad + (k % cols) * (tw + pad), top + pad + (k // cols) * (th + label + pad)
        draw.text((x, y), name, fill="black")
        canvas.paste(tile, (x, y + label))
    return canvas


# --- kept-token overlays ---------------------------------------------------------------------------

@dataclass
class Panel:
    """One method's view: which cells (row-major merged-token indices) were kept and marked."""

    title: str
    grid_h: int
    grid_w: int
    kept: torch.Tensor
    marks: dict[str, torch.Tensor] = field(default_factory=dict)


def grey_out(cell_rgb: np.ndarray) -> np.ndarray:
    """A pruned cell: its luminance pulled toward light grey (R = G = B)."""
    lum = cell_rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = np.round(0.3 * lum + 0.7 * 200).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(image_rgb: np.ndarray, panel: Panel, cell: int = CELL_PX) -> np.ndarray:
    """The image with pruned cells greyed and marked cells dotted; ``image_rgb`` is (H, W, 3) with
    H = grid_h·cell and W = grid_w·cell."""
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
    for name, cells in panel.marks.items():
        colour = MARK_COLOURS.get(name, (255, 0, 255))
        for j in cells.tolist():
            r, c = divmod(j, panel.grid_w)
            cy, cx = r * cell + cell // 2, c * cell + cell // 2
            out[cy - MARK_RADIUS: cy + MARK_RADIUS + 1, cx - MARK_RADIUS: cx + MARK_RADIUS + 1] = colour
    return out


def render_kept(image, panels: list[Panel], cell: int = CELL_PX):
    """Panels side by side, in the order given, each titled; returns (PIL image, panel boxes)."""
    from PIL import Image, ImageDraw

    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    pad, label = 8, 16
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, label + h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for k, panel in enumerate(panels):
        x, y = pad + k * (w + pad), pad + label
        draw.text((x, pad), panel.title, fill="black")
        canvas.paste(Image.fromarray(overlay(rgb, panel, cell)), (x, y))
        boxes.append((x, y, x + w, y + h))
    return canvas, boxes


def model_view(image, grid_h: int, grid_w: int, cell: int = CELL_PX):
    """The image resized to the grid the model used (whole cells), RGB."""
    from PIL import Image

    return image.convert("RGB").resize((grid_w * cell, grid_h * cell), Image.BICUBIC)


def kept_panels(model, processor, image, prompt: str, methods: list[str], params: dict | None = None) -> tuple:
    """Run each method once (a prefill) on one image; returns (model-view image, panels in order).

    ``params`` maps a method name to its keyword parameters."""
    import ivcp

    from .testing import make_inputs

    params = params or {}
    for method in methods:  # bad names fail before any compute
        ivcp.resolve_method(model, method, **params.get(method, {}))
    inputs = make_inputs(processor, prompt, images=[image])
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    merge = processor.image_processor.merge_size
    _, grid_h, grid_w = (int(v) // m for v, m in zip(inputs["image_grid_thw"][0].tolist(), (1, merge, merge)))
    panels = []
    for method in methods:
        with torch.no_grad(), ivcp.prune(model, method, **params.get(method, {})) as session:
            model(**inputs)
        record = session.last
        start, end = record.segments[0]
        inside = lambda idx: idx[(idx >= start) & (idx < end)] - start  # noqa: E731
        share = record.n_visual_kept / record.n_visual
        panels.append(Panel(f"{method}: {record.n_visual_kept}/{record.n_visual} kept ({share:.0%})", grid_h, grid_w,
                            inside(record.kept).cpu(), {k: inside(v).cpu() for k, v in record.marks.items()}))
    return model_view(image, grid_h, grid_w), panels


def save(image, out_dir: str | Path, name: str) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    image.save(target)
    return target
