"""Referring-expression grounding: the prompt, parsing the model's box, IoU and accuracy.

Box conventions of the families (METHODS.md, "Paper settings"):
- Qwen2.5-VL answers ``{"bbox_2d": [x1, y1, x2, y2]}`` (often a JSON list inside a code fence) in
  absolute pixels of the **resized** image (smart_resize to multiples of 28 within the pixel bounds);
  we map it back to the original image.
- Qwen2-VL answers ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` normalised to 0–1000.
- A bare ``[x1, y1, x2, y2]`` is read in the family's own convention.
A malformed answer gives no box (scored 0) and a reason, never an exception.

Two metrics, both reported:
- ``paper`` (the authors' Grounding_COCO.evaluate, the tables' primary column): a strict integer parse
  of ``"bbox_2d": [x1, y1, x2, y2]`` (Qwen2-VL: ``(x1,y1),(x2,y2)`` / 1000), [0, 0, 0, 0] when it
  fails; a box whose numbers are all ≤ 1.1 is read as normalised and scaled by the TSV's width and
  height; IoU ≥ 0.5 against the first ground-truth box in the frame resized to
  round(h/28)·28 × round(w/28)·28 (their convert_to_tsv.py --qwen25), no clamping.
- ``lenient`` (ours): :func:`parse_box` (JSON, code fences, floats, bare lists), mapped to the original
  image and clamped; IoU ≥ 0.5 in the original frame.

Grounding TSVs come in three layouts, recognised by their columns (all need index, image, question,
width, height): ``pixels`` (bbox_x1..bbox_y2 in original pixels: ivcp's and upstream VLMEvalKit's,
per split or the aggregated RefCOCO.tsv with a category/split column), ``normalised`` (upstream's
bbox_x1_norm..bbox_y2_norm in 0–1) and ``authors`` (answer = "x1 y1 x2 y2 ..." integers in the
round(·/28)·28 frame, several boxes as 4·k numbers).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """Qwen-VL's resize rule, the frame Qwen2.5-VL answers in (:func:`ivcp.adapters.qwen2_5_vl.smart_resize`,
    imported on first use: the tables and scripts that read this module need no torch)."""
    from ..adapters.qwen2_5_vl import smart_resize as resize

    return resize(height, width, factor, min_pixels, max_pixels)


GROUNDING_SPLITS = ("RefCOCO_testA", "RefCOCO_testB", "RefCOCO_val", "RefCOCO+_testA", "RefCOCO+_testB",
                    "RefCOCO+_val", "RefCOCOg_test", "RefCOCOg_val")
BOX_CONVENTIONS = ("resized_pixels", "norm1000", "norm999")
FAMILY_CONVENTION = {"qwen2_5_vl": "resized_pixels", "qwen2_vl": "norm1000", "qwen3_vl": "norm1000",
                     "internvl": "norm1000", "deepseek_vl2": "norm999"}

# The authors' grounding prompts (their Qwen2VLPromptMixin._build_vg_prompt), the text after the image:
# Qwen2.5-VL asks for JSON; Qwen2-VL uses its object-reference tokens (the authors also cut the
# expression's last character, ``question[:-1]``: we keep the whole expression, see PROTOCOL notes).
GROUNDING_PROMPTS = {
    "qwen2_5_vl": "\nLocate {expression} and output the bbox coordinates in JSON format.",
    "qwen2_vl": "\n<|object_ref_start|>Detect {expression}<|object_ref_end|>",
    # not in the paper: Qwen2.5-VL's prompt; Qwen3-VL answers "bbox_2d" relative to 1000
    "qwen3_vl": "\nLocate {expression} and output the bbox coordinates in JSON format.",
    # the authors' InternVL grounding (internvl_chat_ivcp / internvl_chat_grounding): [[x1, y1, x2, y2]] in 0–1000
    "internvl": "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>",
    # the authors' DeepSeek-VL2 grounding (deepseekvl2_ivcp): <|ref|>…<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>, the
    # numbers in 0–999 of the original image (DeepSeek-VL2's own drawing code divides by 999)
    "deepseek_vl2": "Locate <|ref|>{expression}<|/ref|> in the given image.",
}


def grounding_prompt(expression: str, family: str = "qwen2_5_vl") -> str:
    """The authors' grounding prompt of a model family (the text that follows the image)."""
    if family not in GROUNDING_PROMPTS:
        raise ValueError(f"no grounding prompt for model family {family!r}; known: {', '.join(GROUNDING_PROMPTS)}")
    if family == "qwen2_vl":
        expression = expression.lower()
    return GROUNDING_PROMPTS[family].format(expression=expression)


_NUMBER = r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?"
_QWEN2_BOX = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")
_BRACKETED = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")


@dataclass(frozen=True)
class ParsedBox:
    box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in the original image's pixels
    raw: tuple[float, float, float, float] | None  # as written by the model
    reason: str = ""  # why there is no box


def _json_box(text: str):
    body = re.sub(r"^```(?:json)?|```$", "", text.strip(), flags=re.M).strip()
    start = min([i for i in (body.find("["), body.find("{")) if i >= 0], default=-1)
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(body[start:])
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict) and "bbox_2d" in item:
            value = item["bbox_2d"]
            if isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
                return tuple(float(v) for v in value)
    return None


def parse_box(text: str, convention: str, original_size: tuple[int, int],
              resized_size: tuple[int, int] | None = None) -> ParsedBox:
    """The answer's first box, in the original image's pixels.

    ``original_size`` and ``resized_size`` are (width, height); ``resized_size`` is needed for the
    ``resized_pixels`` convention (Qwen2.5-VL)."""
    if convention not in BOX_CONVENTIONS:
        raise ValueError(f"box convention must be one of {BOX_CONVENTIONS}, got {convention!r}")
    if not isinstance(text, str) or not text.strip():
        return ParsedBox(None, None, "empty answer")
    raw = _json_box(text)
    if raw is None:
        match = _QWEN2_BOX.search(text) or _BRACKETED.search(text)
        if match is None:
            return ParsedBox(None, None, "no box found")
        raw = tuple(float(match.group(i)) for i in range(1, 5))
    if not all(math.isfinite(v) for v in raw):
        return ParsedBox(None, raw, "non-finite coordinates")
    width, height = original_size
    if convention in ("norm1000", "norm999"):
        scale = 1000.0 if convention == "norm1000" else 999.0
        sx, sy = width / scale, height / scale
    else:
        if resized_size is None:
            raise ValueError("the resized_pixels convention needs the resized image size")
        sx, sy = width / resized_size[0], height / resized_size[1]
    x1, y1, x2, y2 = raw[0] * sx, raw[1] * sy, raw[2] * sx, raw[3] * sy
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    if x2 <= x1 or y2 <= y1:
        return ParsedBox(None, raw, "empty box")
    return ParsedBox((x1, y1, x2, y2), raw)


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when either is empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(rows, threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """Per split: Acc@IoU≥threshold (percent), mean IoU, count and the number of unparsable answers.

    ``rows``: dicts with ``split``, ``prediction`` (a ParsedBox or a box or None) and ``gt`` (a box)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        pred = row["prediction"]
        pred = pred.box if isinstance(pred, ParsedBox) else pred
        value = iou(pred, row["gt"]) if pred is not None else 0.0
        stats = out.setdefault(row["split"], {"n": 0, "hits": 0, "iou_sum": 0.0, "unparsed": 0})
        stats["n"] += 1
        stats["hits"] += value >= threshold
        stats["iou_sum"] += value
        stats["unparsed"] += pred is None
    return {split: {"acc": 100.0 * s["hits"] / s["n"], "miou": s["iou_sum"] / s["n"], "n": s["n"],
                    "unparsed": s["unparsed"]} for split, s in out.items()}


# --- the authors' metric ---------------------------------------------------------------------------

_PAPER_QWEN25 = re.compile(r'"bbox_2d":\s*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\]')
_PAPER_QWEN2 = re.compile(r"\((\d+),(\d+)\),\((\d+),(\d+)\)")
_PAPER_INTERNVL = re.compile(r"\[*\[(.*?),(.*?),(.*?),(.*?)\]\]*")
PAPER_PATCH = 28  # the authors' TSVs: boxes in the round(h / 28) * 28 x round(w / 28) * 28 frame


def paper_prediction(text: str, family: str) -> tuple[float, float, float, float]:
    """The box the authors' code extracts from an answer: [0, 0, 0, 0] when the strict pattern fails.
    Qwen2-VL's (x, y) pairs are divided by 1000 as theirs are; so are Qwen3-VL's 0–1000 "bbox_2d"
    numbers (a family they never ran: their strict parse, then its 0–1000 convention)."""
    if family == "qwen2_vl":
        match = _PAPER_QWEN2.search(text or "")
        return tuple(int(v) / 1000.0 for v in match.groups()) if match else (0.0, 0.0, 0.0, 0.0)
    if family in ("internvl", "deepseek_vl2"):  # their extract_and_normalize_coordinates: / 1000 when they sum to >= 4
        match = _PAPER_INTERNVL.search(text or "")
        try:
            values = tuple(float(v) for v in match.groups()) if match else None
        except ValueError:
            values = None
        if values is None:
            return (0.0, 0.0, 0.0, 0.0)
        return tuple(v / 1000.0 for v in values) if sum(values) >= 4 else values
    match = _PAPER_QWEN25.search(text or "")
    if match is None:
        return (0.0, 0.0, 0.0, 0.0)
    scale = 1000.0 if FAMILY_CONVENTION.get(family) == "norm1000" else 1.0
    return tuple(int(v) / scale for v in match.groups())


def paper_frame(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the authors' ground-truth frame."""
    return round(width / PAPER_PATCH) * PAPER_PATCH, round(height / PAPER_PATCH) * PAPER_PATCH


def paper_iou(prediction: tuple[float, ...], truth: tuple[float, ...], width: int, height: int) -> float:
    """IoU as the authors compute it: normalised predictions (every number ≤ 1.1) scaled by the TSV's
    width / height, no clamping, no +1, float32 with a 1e-6 floor on the union."""
    import numpy as np

    pred = np.asarray(prediction, dtype=np.float64)
    if np.all(pred <= 1.1):
        pred = pred * np.array([width, height, width, height], dtype=np.float64)
    pred, gt = pred.astype(np.float32), np.asarray(truth[:4], dtype=np.float32)
    area_p = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_g = (gt[2] - gt[0]) * (gt[3] - gt[1])
    overlap = max(min(pred[2], gt[2]) - max(pred[0], gt[0]), 0) * max(min(pred[3], gt[3]) - max(pred[1], gt[1]), 0)
    return float(overlap / max(area_p + area_g - overlap, np.float32(1e-6)))


# --- grounding TSVs ------------------------------------------------------------------------------

REQUIRED_COLUMNS = ("index", "image", "question", "width", "height")
LAYOUT_COLUMNS = {"pixels": ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"),
                  "normalised": ("bbox_x1_norm", "bbox_y1_norm", "bbox_x2_norm", "bbox_y2_norm"),
                  "authors": ("answer",)}


BOX_TOLERANCE = 1.0  # pixels a ground-truth box may pass the image's edge by (rounding in the source annotations)


@dataclass(frozen=True)
class GroundTruth:
    """A sample's target box in the original image (``box``, floats) and in the authors' frame
    (``paper_box``, the integers their metric compares with)."""

    box: tuple[float, float, float, float]
    paper_box: tuple[float, float, float, float]


def grounding_layout(columns: Iterable[str], source: str = "the TSV") -> str:
    """The layout of a grounding TSV from its columns; ValueError naming the missing columns."""
    present = set(columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; a grounding TSV needs "
                         f"{', '.join(REQUIRED_COLUMNS)} and a box (bbox_x1..bbox_y2, bbox_x1_norm..bbox_y2_norm "
                         "or the authors' `answer`)")
    for layout, needed in LAYOUT_COLUMNS.items():
        if all(c in present for c in needed):
            return layout
    raise ValueError(f"{source}: no box columns: expected bbox_x1, bbox_y1, bbox_x2, bbox_y2 (pixels), "
                     "bbox_x1_norm..bbox_y2_norm (normalised) or `answer` with \"x1 y1 x2 y2\" (the authors' layout)")


def ground_truth(row: Mapping, layout: str) -> GroundTruth:
    """A row's target box in both frames; ValueError (naming the row's index) when it is unusable."""
    index = row.get("index")
    try:
        width, height = float(row["width"]), float(row["height"])
        if not (width > 0 and height > 0):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"row index {index}: width/height must be positive numbers, got "
                         f"{row.get('width')!r} x {row.get('height')!r}") from None
    frame_w, frame_h = paper_frame(int(width), int(height))
    sx, sy = frame_w / width, frame_h / height
    try:
        if layout == "authors":
            numbers = [float(v) for v in str(row["answer"]).split()]
            if not numbers or len(numbers) % 4:
                raise ValueError
            paper = tuple(numbers[:4])
            box = (paper[0] / sx, paper[1] / sy, paper[2] / sx, paper[3] / sy)
        else:
            columns = LAYOUT_COLUMNS[layout]
            box = tuple(float(row[c]) for c in columns)
            if layout == "normalised":
                box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
            paper = (float(int(round(box[0] * sx))), float(int(round(box[1] * sy))),
                     float(int(round(box[2] * sx))), float(int(round(box[3] * sy))))
        if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError
    except (TypeError, ValueError, KeyError):
        shown = row.get("answer") if layout == "authors" else [row.get(c) for c in LAYOUT_COLUMNS[layout]]
        raise ValueError(f"row index {index}: unusable ground-truth box {shown!r} ({layout} layout)") from None
    tolerance = BOX_TOLERANCE + (max(1 / sx, 1 / sy) if layout == "authors" else 0.0)  # their integer frame
    if box[0] < -tolerance or box[1] < -tolerance or box[2] > width + tolerance or box[3] > height + tolerance:
        raise ValueError(f"row index {index}: the ground-truth box ({', '.join(f'{v:.1f}' for v in box)}) lies outside "
                         f"the {width:g} x {height:g} image ({layout} layout)")
    return GroundTruth(box, paper)


def check_grounding_rows(rows: Iterable[Mapping], layout: str, source: str = "the TSV", images: bool = True) -> None:
    """Validate every row before any inference: distinct indices, usable boxes inside the image, and
    (with ``images``) decodable images of the stated width and height; ValueError naming the file and
    the offending indices."""
    import base64
    import binascii
    import io

    seen: dict[str, int] = {}
    duplicates, problems = [], []
    for row in rows:
        key = str(row.get("index"))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            duplicates.append(key)
        try:
            ground_truth(row, layout)
        except ValueError as error:
            problems.append(str(error))
        if images:
            try:
                from PIL import Image

                image = Image.open(io.BytesIO(base64.b64decode(str(row["image"]), validate=False)))
                size = image.size
                image.verify()
            except (OSError, ValueError, binascii.Error, SyntaxError):
                problems.append(f"row index {key}: the image does not decode")
                continue
            try:
                stated = (float(row["width"]), float(row["height"]))
            except (TypeError, ValueError, KeyError):
                continue  # reported by ground_truth
            if stated != (float(size[0]), float(size[1])):
                problems.append(f"row index {key}: width x height {stated[0]:g} x {stated[1]:g} in the TSV, but the "
                                f"image is {size[0]} x {size[1]}")
    if duplicates:
        problems.insert(0, f"duplicate index value(s) {', '.join(duplicates[:10])}: predictions are stored by index, "
                           "so each row needs its own")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"{source}: " + "; ".join(problems[:10]) + more)
