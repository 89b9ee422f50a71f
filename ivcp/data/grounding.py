"""Synthetic referring-expression grounding data in VLMEvalKit's RefCOCO TSV format.

Each sample is a generated 224 x 224 picture with one to four coloured shapes (distinct colour +
kind) on the 28-pixel grid of Qwen-VL's merged tokens, a referring expression naming one of them
("the red circle"), and its box in absolute pixels of the picture. Columns: index, image (base64 PNG), question (the expression), answer ("[x1, y1, x2, y2]"),
bbox_x1..bbox_y2, width, height, split, category. One TSV per split (``RefCOCO_testA.tsv`` …) and the
aggregated ``RefCOCO.tsv`` with upstream's ``category`` labels ("RefCOCO testA"). Deterministic for a
given seed: the same bytes every time.
"""

from __future__ import annotations

import base64
import csv
import io
import random
from pathlib import Path

from ..eval.grounding import GROUNDING_SPLITS

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 30)}
KINDS = ("square", "circle", "triangle")
COLUMNS = ("index", "image", "question", "answer", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "width", "height",
           "split", "category")
AUTHORS_COLUMNS = ("index", "image", "question", "height", "width", "answer")


def _draw(draw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x1, y1, x2, y2 = box
    if kind == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=colour)


CANVAS = (224, 224)  # width, height: a multiple of 28 on both sides, so no resize happens anywhere
CELL = 28  # one merged visual token of Qwen2-VL / Qwen2.5-VL (14-px patches, 2 x 2 merge)
OBJECT_CELLS = (2, 3)  # object sides in cells
MAX_OBJECTS = 4
NAMES = tuple((colour, kind) for colour in COLOURS for kind in KINDS)


def make_sample(rng: random.Random, canvas: tuple[int, int] = CANVAS, cell: int = CELL,
                max_objects: int = MAX_OBJECTS) -> dict:
    """One picture with 1 to ``max_objects`` shapes of distinct (colour, kind), each a square of 2 or 3
    cells snapped to the ``cell``-pixel grid, none overlapping; the target is one of them.

    The same generator makes ``ivcp data make-grounding``'s TSVs and the tiny grounder's training data
    (``scripts/train_tiny_grounder.py``), so both share one distribution. Returns a dict with
    ``image`` (PIL), ``expression`` ("the red circle"), ``box`` (x1, y1, x2, y2 in pixels, end
    exclusive), ``width``, ``height`` and ``objects`` (every shape's name and box)."""
    from PIL import Image, ImageDraw

    width, height = canvas
    cols, rows = width // cell, height // cell
    image = Image.new("RGB", (width, height), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    names = rng.sample(NAMES, rng.randint(1, max_objects))
    occupied: set[tuple[int, int]] = set()
    objects = []
    for colour, kind in names:
        for _ in range(100):  # place without overlap; a shape that finds no room is left out
            side = rng.choice(OBJECT_CELLS)
            col, row = rng.randint(0, cols - side), rng.randint(0, rows - side)
            cells = {(r, c) for r in range(row, row + side) for c in range(col, col + side)}
            if not cells & occupied:
                occupied |= cells
                box = (col * cell, row * cell, (col + side) * cell, (row + side) * cell)
                _draw(draw, kind, box, COLOURS[colour])
                objects.append({"name": f"the {colour} {kind}", "box": box})
                break
    target = objects[rng.randrange(len(objects))]
    return {"image": image, "expression": target["name"], "box": target["box"], "width": width,
            "height": height, "objects": objects}


def _encode(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_grounding(out_dir: str | Path, per_split: int = 8, seed: int = 0,
                   splits: tuple[str, ...] = GROUNDING_SPLITS, layout: str = "pixels", force: bool = False) -> list[Path]:
    """Write one TSV per split and the aggregated RefCOCO.tsv; returns the paths written.

    ``layout``: ``pixels`` (ivcp's / upstream's columns bbox_x1..bbox_y2 in pixels, plus answer, split,
    category) or ``authors`` (the authors' convert_to_tsv.py --qwen25 columns: index, image, question,
    height, width, answer = "x1 y1 x2 y2" in the round(·/28)·28 frame). Existing files are never
    overwritten unless ``force``: nothing is written then (FileExistsError naming them)."""
    from ..eval.grounding import paper_frame

    if per_split < 1:
        raise ValueError(f"per_split must be at least 1, got {per_split}")
    unknown = [s for s in splits if s not in GROUNDING_SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the grounding splits are {', '.join(GROUNDING_SPLITS)}")
    if layout not in ("pixels", "authors"):
        raise ValueError(f"layout must be 'pixels' or 'authors', got {layout!r}")
    out = Path(out_dir)
    targets = [out / f"{split}.tsv" for split in splits] + [out / "RefCOCO.tsv"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass force=True / --force, or write "
                              "to an empty folder)")
    out.mkdir(parents=True, exist_ok=True)
    all_rows, paths = [], []
    for split_number, split in enumerate(splits):
        rng = random.Random(seed * 1000 + split_number)
        rows = []
        for i in range(per_split):
            sample = make_sample(rng)
            x1, y1, x2, y2 = sample["box"]
            width, height = sample["width"], sample["height"]
            if layout == "authors":
                frame_w, frame_h = paper_frame(width, height)
                sx, sy = frame_w / width, frame_h / height
                answer = " ".join(str(int(round(v))) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy))
                rows.append({"index": i, "image": _encode(sample["image"]), "question": sample["expression"],
                             "height": height, "width": width, "answer": answer})
                continue
            dataset, part = split.split("_")
            rows.append({"index": i, "image": _encode(sample["image"]), "question": sample["expression"],
                         "answer": f"[{x1}, {y1}, {x2}, {y2}]", "bbox_x1": x1, "bbox_y1": y1, "bbox_x2": x2,
                         "bbox_y2": y2, "width": width, "height": height, "split": split,
                         "category": f"{dataset} {part}"})
        columns = AUTHORS_COLUMNS if layout == "authors" else COLUMNS
        paths.append(_write(out / f"{split}.tsv", rows, columns))
        all_rows += [dict(row, index=len(all_rows) + k) for k, row in enumerate(rows)]
    if layout == "pixels":  # upstream's aggregated file (split by `category`); the authors have none
        paths.append(_write(out / "RefCOCO.tsv", all_rows, COLUMNS))
    return paths


def _write(path: Path, rows: list[dict], columns: tuple[str, ...]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_tsv(path: str | Path) -> list[dict]:
    """Rows of a grounding TSV (strings), without pandas."""
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def decode_image(value: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(value))).convert("RGB")
