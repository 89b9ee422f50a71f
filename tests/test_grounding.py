"""Grounding answers, boxes, metrics and the synthetic RefCOCO-format data."""

import hashlib

import numpy as np
import pytest

from ivcp.data.grounding import COLOURS, decode_image, make_grounding, read_tsv
from ivcp.eval.grounding import (GROUNDING_SPLITS, ParsedBox, ground_truth, grounding_layout, grounding_prompt,
                                 grounding_scores, iou, paper_frame, paper_iou, paper_prediction, parse_box, smart_resize)


def test_prompts_are_the_authors():
    # their Qwen2VLPromptMixin._build_vg_prompt: the expression as it is, after a newline
    assert grounding_prompt("the red circle") == "\nLocate the red circle and output the bbox coordinates in JSON format."
    assert grounding_prompt("The Man", "qwen2_vl") == "\n<|object_ref_start|>Detect the man<|object_ref_end|>"
    with pytest.raises(ValueError, match="no grounding prompt for model family 'llama'"):
        grounding_prompt("x", "llama")


def test_the_authors_metric_by_hand():
    assert paper_prediction('```json\n[{"bbox_2d": [12, 3, 40, 50], "label": "x"}]\n```', "qwen2_5_vl") == (12, 3, 40, 50)
    for text in ('{"bbox_2d": [12.0, 3, 40, 50]}', '{"bbox_2d": [ 12, 3, 40, 50]}', "[12, 3, 40, 50]", "",
                 '{"bbox_2d": [-1, 3, 40, 50]}'):
        assert paper_prediction(text, "qwen2_5_vl") == (0, 0, 0, 0), text
    assert paper_prediction("<|box_start|>(100,250),(500,750)<|box_end|>", "qwen2_vl") == (0.1, 0.25, 0.5, 0.75)
    # InternVL: [[x1, y1, x2, y2]] floats, divided by 1000 when they sum to 4 or more (the authors' rule)
    assert paper_prediction("<ref>cat</ref><box>[[100, 250, 500, 750]]</box>", "internvl") == (0.1, 0.25, 0.5, 0.75)
    assert paper_prediction("[[0.1, 0.2, 0.3, 0.4]]", "internvl") == (0.1, 0.2, 0.3, 0.4)
    assert paper_prediction("no box", "internvl") == (0, 0, 0, 0)
    assert paper_frame(300, 200) == (308, 196)  # round(300/28) = 11, round(200/28) = 7
    # normalised (all <= 1.1) predictions are scaled by the TSV's width and height: [0.1, 0.25, 0.5, 0.75]
    # on 300 x 200 -> [30, 50, 150, 150]; against [30, 50, 150, 110]: 120*60 / (120*100) = 0.6
    assert paper_iou((0.1, 0.25, 0.5, 0.75), (30, 50, 150, 110), 300, 200) == pytest.approx(0.6)
    assert paper_iou((0, 0, 0, 0), (30, 50, 150, 110), 300, 200) == 0.0
    # no clamping: a box beyond the image still counts its full area
    assert paper_iou((0, 0, 20, 10), (0, 0, 10, 10), 5, 5) == pytest.approx(0.5)


def test_layouts_and_ground_truth_by_hand():
    base = ["index", "image", "question", "width", "height"]
    assert grounding_layout(base + ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "answer"]) == "pixels"
    assert grounding_layout(base + ["bbox_x1_norm", "bbox_y1_norm", "bbox_x2_norm", "bbox_y2_norm"]) == "normalised"
    assert grounding_layout(base + ["answer"]) == "authors"
    with pytest.raises(ValueError, match=r"f.tsv: missing column\(s\) question, height"):
        grounding_layout(["index", "image", "width", "answer"], "f.tsv")
    row = {"index": 3, "width": 300, "height": 200}
    truth = ground_truth(dict(row, answer="30 20 130 120 1 1 2 2"), "authors")  # the first of several boxes
    assert truth.paper_box == (30, 20, 130, 120)
    assert truth.box == pytest.approx((30 * 300 / 308, 20 * 200 / 196, 130 * 300 / 308, 120 * 200 / 196))
    truth = ground_truth(dict(row, bbox_x1=10, bbox_y1=10, bbox_x2=101, bbox_y2=50), "pixels")
    # their converter: int(round(x * 308 / 300)): 10.27 -> 10, 103.69 -> 104; y * 196 / 200: 9.8 -> 10, 49
    assert truth.box == (10, 10, 101, 50) and truth.paper_box == (10, 10, 104, 49)
    truth = ground_truth(dict(row, bbox_x1_norm=0.1, bbox_y1_norm=0.25, bbox_x2_norm=0.5, bbox_y2_norm=0.75), "normalised")
    assert truth.box == pytest.approx((30, 50, 150, 150))
    with pytest.raises(ValueError, match="row index 3: unusable ground-truth box"):
        ground_truth(dict(row, answer="30 20 10 120"), "authors")  # x2 < x1
    with pytest.raises(ValueError, match="row index 3: width/height must be positive"):
        ground_truth({"index": 3, "width": 0, "height": 5, "answer": "1 1 2 2"}, "authors")


def test_smart_resize_by_hand():
    assert smart_resize(480, 640) == (476, 644)  # 17.14 -> 17 x 28, 22.86 -> 23 x 28
    assert smart_resize(28, 28, min_pixels=4 * 28 * 28) == (56, 56)  # raised to the minimum area
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10)


ORIGINAL, RESIZED = (640, 480), (644, 476)


@pytest.mark.parametrize("text,expected_raw", [
    ('```json\n[\n\t{"bbox_2d": [100, 50, 322, 238], "label": "the cat"}\n]\n```', (100, 50, 322, 238)),
    ('{"bbox_2d": [100, 50, 322, 238]}', (100, 50, 322, 238)),
    ('The box is [100, 50, 322, 238].', (100, 50, 322, 238)),
    ('[100.0, 50.5, 322, 238]', (100.0, 50.5, 322, 238)),
    ('[{"label": "x"}, {"bbox_2d": [1, 2, 3, 4]}]', (1, 2, 3, 4)),
])
def test_qwen25_formats(text, expected_raw):
    parsed = parse_box(text, "resized_pixels", ORIGINAL, RESIZED)
    assert parsed.raw == expected_raw
    sx, sy = 640 / 644, 480 / 476
    x1, y1, x2, y2 = expected_raw
    assert parsed.box == pytest.approx((x1 * sx, y1 * sy, x2 * sx, y2 * sy))


def test_qwen2_normalised_box():
    parsed = parse_box("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|>",
                       "norm1000", ORIGINAL)
    assert parsed.box == pytest.approx((64.0, 120.0, 320.0, 360.0))


@pytest.mark.parametrize("text,reason", [
    ("", "empty answer"),
    ("I cannot see it.", "no box found"),
    ('{"bbox_2d": [1, 2, 3]}', "no box found"),
    ("[10, 10, 10, 40]", "empty box"),
    ("[inf, 1, 2, 3]", "no box found"),
])
def test_malformed_answers_give_no_box(text, reason):
    parsed = parse_box(text, "resized_pixels", ORIGINAL, RESIZED)
    assert parsed.box is None and parsed.reason == reason


def test_boxes_are_clipped_and_ordered():
    parsed = parse_box("[700, 500, -20, 10]", "resized_pixels", ORIGINAL, RESIZED)
    assert parsed.box == pytest.approx((0.0, 10 * 480 / 476, 640.0, 480.0))
    with pytest.raises(ValueError, match="box convention"):
        parse_box("[1, 2, 3, 4]", "pixels", ORIGINAL)


def test_iou_by_hand():
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)


def test_accuracy_on_a_hand_built_prediction_file():
    gt = (0, 0, 10, 10)
    rows = [
        {"split": "RefCOCO_val", "prediction": (0, 0, 10, 10), "gt": gt},  # IoU 1
        {"split": "RefCOCO_val", "prediction": (0, 0, 10, 5), "gt": gt},  # IoU 0.5: counts (>=)
        {"split": "RefCOCO_val", "prediction": (5, 5, 15, 15), "gt": gt},  # IoU 0.143
        {"split": "RefCOCO_val", "prediction": ParsedBox(None, None, "no box found"), "gt": gt},
        {"split": "RefCOCO_testA", "prediction": (0, 0, 10, 10), "gt": gt},
    ]
    scores = grounding_scores(rows)
    assert scores["RefCOCO_val"]["acc"] == 50.0
    assert scores["RefCOCO_val"]["miou"] == pytest.approx((1 + 0.5 + 25 / 175 + 0) / 4)
    assert scores["RefCOCO_val"]["unparsed"] == 1 and scores["RefCOCO_val"]["n"] == 4
    assert scores["RefCOCO_testA"] == {"acc": 100.0, "miou": 1.0, "n": 1, "unparsed": 0}


def test_make_grounding_writes_every_split_deterministically(tmp_path):
    paths = make_grounding(tmp_path / "a", per_split=3, seed=1)
    again = make_grounding(tmp_path / "b", per_split=3, seed=1)
    assert [p.name for p in paths] == [f"{s}.tsv" for s in GROUNDING_SPLITS] + ["RefCOCO.tsv"]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(p) for p in paths] == [digest(p) for p in again]
    aggregated = read_tsv(tmp_path / "a" / "RefCOCO.tsv")
    assert len(aggregated) == 3 * len(GROUNDING_SPLITS)
    assert {row["category"] for row in aggregated} == {s.replace("_", " ") for s in GROUNDING_SPLITS}
    assert [int(r["index"]) for r in aggregated] == list(range(len(aggregated)))


def test_grounding_samples_are_right(tmp_path):
    make_grounding(tmp_path, per_split=6, seed=0, splits=("RefCOCO_val",))
    for row in read_tsv(tmp_path / "RefCOCO_val.tsv"):
        image = decode_image(row["image"])
        assert image.size == (int(row["width"]), int(row["height"]))
        x1, y1, x2, y2 = (int(row[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        assert row["answer"] == f"[{x1}, {y1}, {x2}, {y2}]"
        assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        colour = row["question"].split()[1]
        # the middle of the lower part of the box is inside every shape kind (square, circle, triangle)
        pixel = np.asarray(image)[(y1 + 3 * (y2 - y1) // 4), (x1 + x2) // 2]
        assert tuple(pixel) == COLOURS[colour]


def test_samples_snap_to_the_token_grid(tmp_path):
    import random

    from ivcp.data.grounding import make_sample

    rng = random.Random(5)
    for _ in range(50):
        sample = make_sample(rng)
        assert (sample["width"], sample["height"]) == (224, 224) and 1 <= len(sample["objects"]) <= 4
        names = [o["name"] for o in sample["objects"]]
        assert len(set(names)) == len(names) and sample["expression"] in names
        for obj in sample["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert all(v % 28 == 0 for v in obj["box"]) and x2 - x1 == y2 - y1 in (56, 84)
        boxes = [o["box"] for o in sample["objects"]]
        for i, a in enumerate(boxes):  # no two overlap
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_authors_layout_and_no_silent_overwrite(tmp_path):
    paths = make_grounding(tmp_path / "a", per_split=2, seed=1, layout="authors")
    assert [p.name for p in paths] == [f"{s}.tsv" for s in GROUNDING_SPLITS]  # no aggregate: theirs has none
    rows = read_tsv(paths[0])
    assert list(rows[0]) == ["index", "image", "question", "height", "width", "answer"]
    pixels = read_tsv(make_grounding(tmp_path / "p", per_split=2, seed=1, splits=(GROUNDING_SPLITS[0],))[0])
    for theirs, ours in zip(rows, pixels):  # 224 x 224 is its own 28-px frame: the same numbers
        assert theirs["answer"] == " ".join(ours[k] for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
    before = paths[0].read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_grounding(tmp_path / "a", per_split=3, seed=2, layout="authors")
    assert paths[0].read_bytes() == before
    make_grounding(tmp_path / "a", per_split=3, seed=2, layout="authors", force=True)
    assert len(read_tsv(paths[0])) == 3


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="per_split"):
        make_grounding(tmp_path, per_split=0)
    with pytest.raises(ValueError, match="unknown split"):
        make_grounding(tmp_path, splits=("RefCOCO_train",))


def test_the_table_modules_load_without_torch():
    """The tables (scripts/collect_results.py, the main job's last step) read the grounding rules without
    loading torch (seconds per call on a busy machine); the resize rule is still the adapter's."""
    import subprocess
    import sys

    code = ("import sys, ivcp.eval.grounding, ivcp.eval.rundata, ivcp.eval.stats, ivcp.eval.protocol, ivcp.results; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False"]
    from ivcp.adapters.qwen2_5_vl import smart_resize
    from ivcp.eval.grounding import smart_resize as lazy

    for size in ((480, 640), (20, 20), (5000, 300)):
        assert lazy(*size, 28, 3136, 200704) == smart_resize(*size, 28, 3136, 200704)
        assert lazy(*size) == smart_resize(*size)


def test_prediction_files_are_read_once_per_version(tmp_path):
    """rundata reads a prediction file once however often a table asks, and again once it changed."""
    import os

    import pandas as pd

    from ivcp.eval import rundata

    path = tmp_path / "M_RefCOCO_val.tsv"
    pd.DataFrame({"index": [0, 1], "prediction": ["a", "b"]}).to_csv(path, sep="\t", index=False)
    before = rundata._read_predictions_version.cache_info().misses
    assert rundata.answered_indices(path) == ["0", "1"] and rundata.readable_predictions(path)
    assert rundata._read_predictions_version.cache_info().misses == before + 1
    pd.DataFrame({"index": [0, 1, 2], "prediction": ["a", "b", "c"]}).to_csv(path, sep="\t", index=False)
    os.utime(path, ns=(1, 1))  # a new version even where the clock did not move
    assert rundata.answered_indices(path) == ["0", "1", "2"]
    path.write_text("")
    assert rundata.answered_indices(path) is None and not rundata.readable_predictions(tmp_path / "missing.tsv")
