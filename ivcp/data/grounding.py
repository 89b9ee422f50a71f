"""Synthetic referring-expression grounding data in VLMEvalKit's RefCOCO TSV format.

Each sample is a generated picture with two to four coloured shapes (distinct colour + kind), a
referring expression naming one of them ("the red circle"), and its box in absolute pixels of the
picture. Columns: index, image (base64 PNG), question (the expression), answer ("[x1, y1, x2, y2]"),
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


def _draw(draw, kind: str, box: tuple[int, int, int, int], colour) -> None:
    x1, y1, x2, y2 = box
    if kind == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif kind == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=colour)


def make_sample(rng: random.Random) -> dict:
    """One picture, its shapes, and the target (a dict with the image and the target's box)."""
    from PIL import Image, ImageDraw

    width, height = rng.choice([(320, 240), (400, 300), (448, 336), (360, 480)])
    image = Image.new("RGB", (width, height), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    count = rng.randint(2, 4)
    names = rng.sample([(c, k) for c in COLOURS for k in KINDS], count)
    boxes: list[tuple[int, int, int, int]] = []
    for colour, kind in names:
        for _ in range(100):  # place without overlap
            side = rng.randint(min(width, height) // 6, min(width, height) // 3)
            x1, y1 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x1, y1, x1 + side, y1 + side)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        boxes.append(box)
        _draw(draw, kind, box, COLOURS[colour])
    target = rng.randrange(count)
    colour, kind = names[target]
    return {"image": image, "expression": f"the {colour} {kind}", "box": boxes[target], "width": width, "height": height}


def _encode(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_grounding(out_dir: str | Path, per_split: int = 8, seed: int = 0,
                   splits: tuple[str, ...] = GROUNDING_SPLITS) -> list[Path]:
    """Write one TSV per split and the aggregated RefCOCO.tsv; returns the paths written."""
    if per_split < 1:
        raise ValueError(f"per_split must be at least 1, got {per_split}")
    unknown = [s for s in splits if s not in GROUNDING_SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the grounding splits are {', '.join(GROUNDING_SPLITS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_rows, paths = [], []
    for split_number, split in enumerate(splits):
        rng = random.Random(seed * 1000 + split_number)
        rows = []
        for i in range(per_split):
            sample = make_sample(rng)
            x1, y1, x2, y2 = sample["box"]
            dataset, part = split.split("_")
            rows.append({"index": i, "image": _encode(sample["image"]), "question": sample["expression"],
                         "answer": f"[{x1}, {y1}, {x2}, {y2}]", "bbox_x1": x1, "bbox_y1": y1, "bbox_x2": x2,
                         "bbox_y2": y2, "width": sample["width"], "height": sample["height"], "split": split,
                         "category": f"{dataset} {part}"})
        paths.append(_write(out / f"{split}.tsv", rows))
        all_rows += [dict(row, index=len(all_rows) + k) for k, row in enumerate(rows)]
    paths.append(_write(out / "RefCOCO.tsv", all_rows))
    return paths


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
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
