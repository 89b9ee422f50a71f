"""Referring-expression grounding: the prompt, parsing the model's box, IoU and accuracy.

Box conventions of the families (METHODS.md, "Paper settings"):
- Qwen2.5-VL answers ``{"bbox_2d": [x1, y1, x2, y2]}`` (often a JSON list inside a code fence) in
  absolute pixels of the **resized** image (smart_resize to multiples of 28 within the pixel bounds);
  we map it back to the original image.
- Qwen2-VL answers ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` normalised to 0–1000.
- A bare ``[x1, y1, x2, y2]`` is read in the family's own convention.
A malformed answer gives no box (scored 0) and a reason, never an exception.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from ..adapters.qwen2_5_vl import smart_resize  # noqa: F401  (re-exported: the resized frame)

GROUNDING_SPLITS = ("RefCOCO_testA", "RefCOCO_testB", "RefCOCO_val", "RefCOCO+_testA", "RefCOCO+_testB",
                    "RefCOCO+_val", "RefCOCOg_test", "RefCOCOg_val")
BOX_CONVENTIONS = ("resized_pixels", "norm1000")
FAMILY_CONVENTION = {"qwen2_5_vl": "resized_pixels", "qwen2_vl": "norm1000"}

QWEN25_PROMPT = "Locate {expression} and output the bbox coordinates in JSON format."


def grounding_prompt(expression: str) -> str:
    """The paper's Qwen2.5-VL grounding prompt."""
    return QWEN25_PROMPT.format(expression=expression.strip())


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
    if convention == "norm1000":
        sx, sy = width / 1000.0, height / 1000.0
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
