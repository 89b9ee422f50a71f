"""The VLMEvalKit plugin against the pip-installed VLMEvalKit: the authors' inputs (prompts, pixels,
generation), grounding data in all layouts and both metrics, statistics that survive a resume, and
the scripts' exit codes."""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vlmeval = pytest.importorskip("vlmeval", reason="VLMEvalKit is the eval tier (bash scripts/setup.sh without --core)")

import pandas as pd  # noqa: E402
from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin  # noqa: E402

from ivcp import vlmeval_plugin as plugin  # noqa: E402
from ivcp.data.grounding import make_grounding  # noqa: E402
from ivcp.eval import stats  # noqa: E402
from ivcp.eval.protocol import all_run_names  # noqa: E402
from ivcp.testing import make_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TABLE2 = ("SEEDBench_IMG", "MMBench_DEV_EN_V11", "MMStar", "RealWorldQA", "AI2D_TEST", "MME", "POPE", "HallusionBench",
          "TextVQA_VAL")


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _wrapper(name: str, **overrides):
    """Build a registered model with its real settings; offline checkpoints stand in for real ones."""
    factory = plugin.model_registry()[name]
    keywords = dict(factory.keywords)
    if not keywords["model_path"].startswith("tiny"):
        keywords["model_path"] = f"tiny:{keywords['family']}"
    keywords.update(overrides)
    return factory.func(**keywords)


@pytest.fixture
def lmudata(tmp_path, monkeypatch):
    folder = tmp_path / "lmu"
    make_grounding(folder, per_split=12, seed=3)
    monkeypatch.setenv("LMUData", str(folder))
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    return folder


def test_import_ivcp_does_not_import_vlmevalkit():
    code = "import sys, ivcp, ivcp.eval.grounding, ivcp.results; print('vlmeval' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_name_is_registered_with_the_authors_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    names = plugin.register()
    from vlmeval.config import supported_VLM

    assert set(names) == set(all_run_names()) and set(names) <= set(supported_VLM)
    keywords = {name: supported_VLM[name].keywords for name in names}
    seven_b = keywords["Qwen2.5-VL-7B-Instruct_IVCP"]
    assert (seven_b["method"], seven_b["protocol"], seven_b["min_pixels"], seven_b["max_pixels"]) == \
        ("ivc_prune", "authors", 4 * 28 * 28, 16384 * 28 * 28)
    assert keywords["Qwen2.5-VL-7B-Instruct_Grounding_IVCP"]["method"] == "ivc_prune"
    assert keywords["Qwen2.5-VL-3B-Instruct_FastV"]["max_pixels"] == 6384 * 28 * 28  # the authors' 3B entry (sic)
    assert keywords["Qwen2-VL-7B-Instruct"]["min_pixels"] == 1280 * 28 * 28
    assert keywords["Qwen2.5-VL-7B-Instruct_DatasetPrompt"] == dict(seven_b, name="Qwen2.5-VL-7B-Instruct_DatasetPrompt",
                                                                    method=None, method_params={}, protocol="dataset")
    for entry in keywords.values():
        assert entry["generation"]["repetition_penalty"] == 1.0 and entry["generation"]["do_sample"] is False
    # one of each family x method builds (offline weights) and answers
    image = tmp_path / "picture.png"
    make_image(224, 168).save(image)
    for name in ("Qwen2.5-VL-7B-Instruct_VScan", "Qwen2-VL-7B-Instruct_AdaptPrune", "Qwen2.5-VL-32B-Instruct_WFastV",
                 "Qwen2.5-VL-3B-Instruct_Random", "Qwen2.5-VL-Tiny_PDrop_DatasetPrompt"):
        model = _wrapper(name, generation=dict(seven_b["generation"], max_new_tokens=3))
        assert isinstance(model.generate([dict(type="image", value=str(image)), dict(type="text", value="Where?")],
                                         dataset="RefCOCO_val"), str)
        entry = list(stats.read(name, "RefCOCO_val").values())[-1]
        assert (entry["n_visual_kept"] < entry["n_visual"]) == (keywords[name]["method"] is not None)


@pytest.fixture
def table2(tmp_path, monkeypatch):
    """One synthetic row of each Table 2 benchmark, loaded by VLMEvalKit's own dataset classes."""
    import vlmeval.dataset as datasets
    from vlmeval.dataset import DATASET_TYPE, build_dataset

    folder = tmp_path / "lmu2"
    folder.mkdir()
    monkeypatch.setenv("LMUData", str(folder))
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    image = _png(make_image(300, 200))
    built = {}
    for name in TABLE2:
        kind = DATASET_TYPE(name)
        row = dict(index=7, image=image, question="What colour is the largest shape?", category="colour",
                   answer={"MCQ": "B", "Y/N": "yes"}.get(kind, "blue"))
        if kind == "MCQ":
            row.update(A="red", B="blue", C="green", D="yellow", hint="Shapes are drawn on a gradient.")
        pd.DataFrame([row]).to_csv(folder / f"{name}.tsv", sep="\t", index=False)
        cls = next(c for c in datasets.DATASET_CLASSES if name in c.supported_datasets())
        if name in getattr(cls, "DATASET_MD5", {}):  # the real file's checksum would trigger a download
            monkeypatch.delitem(cls.DATASET_MD5, name)
        built[name] = build_dataset(name)
    return built


class _PipMixin(Qwen2VLPromptMixin):
    """The oracle: pip VLMEvalKit's own prompt builder, on its own."""


def _received(model, dataset, line, name):
    """What VLMEvalKit's infer_data does for one row, then the text the model received."""
    model.set_dump_image(dataset.dump_image)
    message = model.build_prompt(line, dataset=name) if model.use_custom_prompt(name) else dataset.build_prompt(line)
    model.generate(message, dataset=name)
    return message, model.last_prompt_text


def _rendered(model, message) -> str:
    content = [{"type": "image"} if m["type"] == "image" else {"type": "text", "text": m["value"]} for m in message]
    return model.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.mark.parametrize("protocol", ["authors", "dataset"])
def test_prompts_equal_the_authors_or_the_datasets(table2, protocol):
    suffix = "" if protocol == "authors" else "_DatasetPrompt"
    model = _wrapper("Qwen2.5-VL-7B-Instruct_FastV" + suffix, generation={"max_new_tokens": 1, "do_sample": False,
                                                                          "repetition_penalty": 1.0})
    oracle = _PipMixin(use_custom_prompt=True)
    for name, dataset in table2.items():
        line = dataset.data.iloc[0]
        oracle.set_dump_image(dataset.dump_image)
        if protocol == "authors" and oracle.use_custom_prompt(name):
            expected = oracle.build_prompt(line, name)
        else:
            expected = dataset.build_prompt(line)
        message, text = _received(model, dataset, line, name)
        assert message == expected, name
        assert text == _rendered(model, expected), name
        assert stats.read(model.name, name)["7"]["protocol"] == protocol  # stats keyed by the row's index
    # the authors' custom prompts, written out (PROTOCOL.md): independent of VLMEvalKit's code
    if protocol == "authors":
        texts = {name: _received(model, ds, ds.data.iloc[0], name)[0][-1]["value"] for name, ds in table2.items()}
        assert texts["MMStar"] == ("Hint: Shapes are drawn on a gradient.\nQuestion: What colour is the largest shape?\n"
                                   "Options:\nA. red\nB. blue\nC. green\nD. yellow\n"
                                   "Please select the correct answer from the options above.")
        assert texts["POPE"] == texts["HallusionBench"] == "What colour is the largest shape? Please answer yes or no."
        assert texts["MME"] == "What colour is the largest shape?"
        assert texts["TextVQA_VAL"] == ("What colour is the largest shape?\n"
                                        "Please try to answer the question with short words or phrases if possible.")
    else:  # the datasets' own MCQ prompt keeps VLMEvalKit's trailing " \n"
        assert _received(model, table2["MMStar"], table2["MMStar"].data.iloc[0], "MMStar")[0][-1]["value"].endswith(
            "from the options above. \n")


def test_qwen3_prompts_follow_vlmevalkits_qwen3_wrapper(table2, tmp_path):
    from vlmeval.vlm.qwen3_vl.prompt import Qwen3VLPromptMixin

    class PipQwen3(Qwen3VLPromptMixin):
        """The oracle: pip VLMEvalKit's Qwen3-VL prompt builder."""

    oracle = PipQwen3(use_custom_prompt=True)
    settings = {"max_new_tokens": 1, "do_sample": False, "repetition_penalty": 1.0}
    for name in ("Qwen3-VL-8B-Instruct_IVCP", "Qwen3-VL-30B-A3B-Instruct_PDrop_DatasetPrompt"):
        model = _wrapper(name, generation=settings, model_path="tiny:qwen3_vl_moe" if "A3B" in name else "tiny:qwen3_vl")
        for bench, dataset in table2.items():
            line = dataset.data.iloc[0]
            oracle.set_dump_image(dataset.dump_image)
            custom = model.protocol == "authors" and oracle.use_custom_prompt(bench)
            expected = oracle.build_prompt(line, bench) if custom else dataset.build_prompt(line)
            message, text = _received(model, dataset, line, bench)
            assert message == expected, (name, bench)
            assert text == _rendered(model, expected), (name, bench)
    assert _received(model, table2["POPE"], table2["POPE"].data.iloc[0], "POPE")[1].startswith("<|im_start|>user\n")


def test_internvl_prompts_are_the_authors(table2, lmudata):
    """The authors' InternVLChatIVCP: VLMEvalKit's InternVLChat prompts, the remote code's chat() text with
    the internvl2_5 system message (written out here), tiles within 6."""
    from vlmeval.dataset import build_dataset

    system = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    question = "What colour is the largest shape?"
    expected = {
        "MMStar": f"Shapes are drawn on a gradient.\n{question}\nA. red\nB. blue\nC. green\nD. yellow\n"
                  "Answer with the option's letter from the given choices directly.",
        "MME": f"{question} Answer the question using a single word or phrase.",
        "POPE": question,
        "HallusionBench": f"{question} Please answer yes or no. Answer the question using a single word or phrase.",
        "TextVQA_VAL": f"{question}\nAnswer the question using a single word or phrase.",
    }
    model = _wrapper("InternVL2_5-8B_IVCPAuthors", generation={"max_new_tokens": 1, "do_sample": False,
                                                               "repetition_penalty": 1.0})
    assert model.method_params["foreground_source"] == "thumbnail"
    for name, text in expected.items():
        _, received = _received(model, table2[name], table2[name].data.iloc[0], name)
        assert received == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image>\n{text}<|im_end|>\n"
                            "<|im_start|>assistant\n"), name
    # 300 x 200 picture: 3 x 2 tiles (aspect 1.5) + the thumbnail, 16 tokens each on the tiny model
    assert stats.read(model.name, "POPE")["7"]["n_visual"] == 7 * 16
    grounding = build_dataset("RefCOCO_val")
    line = grounding.data.iloc[0].copy()
    line["question"] = "the red circle"
    _, received = _received(model, grounding, line, "RefCOCO_val")
    assert "user\n<image>\nPlease provide the bounding box coordinate of the region this sentence describes: " \
           "<ref>the red circle</ref><|im_end|>" in received


def test_llava_prompts_are_the_authors_vicuna_text(table2):
    """The authors' LLaVAIVCP: VLMEvalKit's LLaVA prompts, "system USER: <content> ASSISTANT: " with
    each image as " <image> " (written out here from PROTOCOL.md, not taken from any code)."""
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions. ")
    question = "What colour is the largest shape?"
    expected = {
        "MMStar": f"Shapes are drawn on a gradient.\n{question}\nA. red\nB. blue\nC. green\nD. yellow\n"
                  "Answer with the option's letter from the given choices directly.",
        "POPE": question,  # Y/N: the dataset's prompt, unchanged
        "TextVQA_VAL": f"{question}\nAnswer the question using a single word or phrase.",
    }
    model = _wrapper("llava-1.5-7b-hf_IVCPAuthors", generation={"max_new_tokens": 1, "do_sample": False,
                                                                "repetition_penalty": 1.0})
    assert model.method_params == {"budget_mode": "reference_union", "foreground_softmax": "sequence",
                                   "trim_layer0_kv": False, "text_query_offset": 2}
    for name, text in expected.items():
        _, received = _received(model, table2[name], table2[name].data.iloc[0], name)
        assert received == f"{system}USER:  <image> {text} ASSISTANT: ", name
    entry = stats.read(model.name, "POPE")["7"]
    assert entry["n_visual"] == 64 and entry["n_visual_kept"] < 64  # one image of 8 x 8 tokens, pruned
    dataset_protocol = _wrapper("llava-1.5-7b-hf_DatasetPrompt", generation=model.generate_kwargs | {"do_sample": False})
    _, received = _received(dataset_protocol, table2["MMStar"], table2["MMStar"].data.iloc[0], "MMStar")
    assert received.endswith("Please select the correct answer from the options above. \n ASSISTANT: ")


@pytest.mark.parametrize("name,expected", [
    ("Qwen2.5-VL-7B-Instruct_IVCP", "\nLocate the red circle and output the bbox coordinates in JSON format."),
    ("Qwen2.5-VL-7B-Instruct_DatasetPrompt", "\nLocate the red circle and output the bbox coordinates in JSON format."),
    ("Qwen2-VL-7B-Instruct", "\n<|object_ref_start|>Detect the red circle<|object_ref_end|>"),
    ("Qwen3-VL-8B-Instruct_VScan", "\nLocate the red circle and output the bbox coordinates in JSON format."),
])
def test_grounding_prompt_image_and_generation_settings(lmudata, name, expected, monkeypatch):
    plugin.register()
    from vlmeval.dataset import build_dataset

    dataset = build_dataset("RefCOCO_val")
    line = dataset.data.iloc[0].copy()
    line["question"] = "the red circle"
    model = _wrapper(name)
    seen = {}
    generate = model.model.generate
    monkeypatch.setattr(model.model, "generate", lambda **kw: seen.update(kw) or generate(**kw), raising=False)
    message, text = _received(model, dataset, line, "RefCOCO_val")
    assert message[-1] == {"type": "text", "value": expected} and message[0]["type"] == "image"
    assert text == _rendered(model, message)
    assert (seen["repetition_penalty"], seen["do_sample"], seen["max_new_tokens"]) == (1.0, False, 512)


def test_images_are_resized_within_the_entrys_pixel_bounds(tmp_path, monkeypatch):
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    image = tmp_path / "wide.png"
    make_image(1000, 300).save(image)
    model = _wrapper("Qwen2.5-VL-Tiny", generation={"max_new_tokens": 1, "do_sample": False, "repetition_penalty": 1.0})
    model.generate([dict(type="image", value=str(image)), dict(type="text", value="Hi")], dataset="RefCOCO_val")
    # smart_resize(300, 1000, 28, 3136, 200704): 11 x 36 cells = 396 x 28² = 310464 > max, so
    # beta = sqrt(300000 / 200704) = 1.2226: floor(300 / 1.2226 / 28) = 8, floor(1000 / 1.2226 / 28) = 29
    assert list(stats.read(model.name, "RefCOCO_val").values())[-1]["n_visual"] == 8 * 29


# --- grounding data and metrics --------------------------------------------------------------------

def _authors_tsv(path: Path, rows: list[tuple[int, str]]) -> None:
    image = _png(make_image(300, 200))
    frame = pd.DataFrame([{"index": i, "image": image, "question": f"thing {i}", "height": 200, "width": 300,
                           "answer": answer} for i, answer in rows])
    frame.to_csv(path, sep="\t", index=False)


def test_authors_layout_and_both_metrics_by_hand(tmp_path, monkeypatch):
    lmu = tmp_path / "lmu"
    lmu.mkdir()
    monkeypatch.setenv("LMUData", str(lmu))
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    # 300 x 200 image: the authors' frame is round(300/28)*28 x round(200/28)*28 = 308 x 196, which is
    # also the tiny model's resized frame (within its pixel bounds)
    _authors_tsv(lmu / "RefCOCO_val.tsv", [(0, "30 20 130 120"), (1, "30 20 130 120"), (2, "30 20 130 120"),
                                           (3, "30 20 130 120"), (4, "0 0 308 196 5 5 9 9")])
    plugin.register()
    dataset = plugin.IVCPGrounding(dataset="RefCOCO_val")
    assert dataset.layout == "authors"
    data = dataset.data.drop(columns=["image"]).copy()
    data["prediction"] = [
        '{"bbox_2d": [30, 20, 130, 120]}',  # exact: both metrics hit
        '{"bbox_2d": [30.5, 20, 130, 120]}',  # a float: the strict parse fails, the lenient one hits
        "[30, 20, 130, 120]",  # a bare list: likewise
        '{"bbox_2d": [0, 0, 1, 1]}',  # all <= 1.1: read as normalised -> [0, 0, 300, 200], IoU 1/6: miss
        '{"bbox_2d": [0, 0, 1, 1]}',  # ... against the whole image: IoU 300*196 / (308*196) = 0.974: paper hit
    ]
    eval_file = tmp_path / "Qwen2.5-VL-Tiny_RefCOCO_val.xlsx"
    data.to_excel(eval_file, index=False)
    for i in range(5):
        stats.record("Qwen2.5-VL-Tiny", "RefCOCO_val", i, {"visual_kv_share": 0.1 * (i + 1)})
    result = dataset.evaluate(str(eval_file)).iloc[0]
    assert result["Acc@0.5"] == pytest.approx(100 * 2 / 5)  # rows 0 and 4
    assert result["Acc@0.5 lenient"] == pytest.approx(100 * 3 / 5)  # rows 0, 1, 2
    assert result["unparsed paper"] == 2 and result["avg_tokens"] == pytest.approx(0.3)


@pytest.mark.parametrize("broken,message", [
    ("no_width", "missing column(s) width"),
    ("no_box", "no box columns"),
    ("duplicate", "duplicate index value(s) 1"),
    ("bad_image", "row index 2: the image does not decode"),
    ("bad_answer", "row index 1: unusable ground-truth box '10 20 30'"),
    ("wrong_size", "row index 1: width x height 300 x 250 in the TSV, but the image is 300 x 200"),
    ("box_outside", "row index 2: the ground-truth box (1.0, 2.0, 389.6, 40.8) lies outside the 300 x 200 image"),
    ("header_only", "no rows (only a header)"),
    ("empty_file", "the file is empty (0 bytes)"),
])
def test_bad_grounding_tsvs_fail_before_inference_naming_the_problem(tmp_path, monkeypatch, broken, message):
    lmu = tmp_path / "lmu"
    lmu.mkdir()
    monkeypatch.setenv("LMUData", str(lmu))
    path = lmu / "RefCOCO_val.tsv"
    _authors_tsv(path, [(0, "1 2 30 40"), (1, "10 20 30" if broken == "bad_answer" else "1 2 30 40"),
                        (1 if broken == "duplicate" else 2, "1 2 30 40")])
    frame = pd.read_csv(path, sep="\t")
    if broken == "no_width":
        frame = frame.drop(columns=["width"])
    elif broken == "no_box":
        frame = frame.drop(columns=["answer"])
    elif broken == "bad_image":
        frame.loc[2, "image"] = "bm90IGFuIGltYWdl"  # "not an image"
    elif broken == "wrong_size":
        frame.loc[1, "height"] = 250
    elif broken == "box_outside":  # x2 = 400 in the 308-wide frame: 389.6 px of a 300-px image
        frame.loc[2, "answer"] = "1 2 400 40"
    elif broken == "header_only":
        frame = frame.iloc[:0]
    frame.to_csv(path, sep="\t", index=False)
    if broken == "empty_file":
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        plugin.IVCPGrounding(dataset="RefCOCO_val")
    assert str(path) in str(error.value)


def test_splits_layouts_and_the_aggregate(lmudata):
    plugin.register()
    from vlmeval.dataset import build_dataset

    dataset = build_dataset("RefCOCO+_testB")
    assert isinstance(dataset, plugin.IVCPGrounding) and len(dataset) == 12 and dataset.layout == "pixels"
    (lmudata / "RefCOCO+_testB.tsv").unlink()  # only the aggregated file left: split by category
    again = build_dataset("RefCOCO+_testB")
    assert len(again) == 12 and list(again.data["question"]) == list(dataset.data["question"])
    for path in lmudata.glob("*.tsv"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="in a folder of their own"):
        plugin.IVCPGrounding(dataset="RefCOCO_val")


def _answer(family: str, box) -> str:
    """An exact answer in a family's own box convention, on the synthetic 224 x 224 pictures (written
    out from each family's documented format, not from the parser)."""
    x1, y1, x2, y2 = box
    n = [round(v * 1000 / 224) for v in box]  # 0-1000
    return {"qwen2_5_vl": f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}',  # pixels of the resized (= same) frame
            "qwen3_vl": f'{{"bbox_2d": [{n[0]}, {n[1]}, {n[2]}, {n[3]}]}}',
            "qwen2_vl": f"<|box_start|>({n[0]},{n[1]}),({n[2]},{n[3]})<|box_end|>",
            "internvl": f"<ref>it</ref><box>[[{n[0]}, {n[1]}, {n[2]}, {n[3]}]]</box>"}[family]


@pytest.mark.parametrize("name", ["InternVL-Tiny", "InternVL2_5-8B_IVCP", "Qwen2-VL-Tiny", "Qwen3-VL-Tiny",
                                  "Qwen2.5-VL-Tiny_FastV"])
def test_every_family_grounding_evaluates_by_hand(lmudata, tmp_path, name):
    """Every family's answers scored in its own convention (InternVL's evaluate used to call Qwen's
    resize with no pixel bounds and fail after all inference): exact boxes on the even rows, no box on
    the odd ones -> 50 % by both metrics."""
    plugin.register()
    family = all_run_names()[name].model.family
    dataset = plugin.IVCPGrounding(dataset="RefCOCO_val")
    data = dataset.data.drop(columns=["image"]).copy()
    boxes = data[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]].astype(int).values.tolist()
    data["prediction"] = [_answer(family, box) if k % 2 == 0 else "I do not know." for k, box in enumerate(boxes)]
    eval_file = tmp_path / f"{name}_RefCOCO_val.xlsx"
    data.to_excel(eval_file, index=False)
    result = dataset.evaluate(str(eval_file)).iloc[0]
    assert (result["Acc@0.5"], result["Acc@0.5 lenient"], result["n"]) == (50.0, 50.0, 12)
    assert result["unparsed paper"] == 6 and result["unparsed lenient"] == 6


def test_lmudata_unset_or_mistyped_is_an_error(tmp_path, monkeypatch):
    from ivcp.eval.rundata import lmudata_root

    monkeypatch.setenv("HOME", str(tmp_path))  # VLMEvalKit's fallback would be (and create) $HOME/LMUData
    monkeypatch.delenv("LMUData", raising=False)
    with pytest.raises(ValueError, match="RefCOCO_val: LMUData is not set"):
        plugin.IVCPGrounding(dataset="RefCOCO_val")
    monkeypatch.setenv("LMUData", str(tmp_path / "LMUDta"))
    with pytest.raises(ValueError, match=f"LMUData={tmp_path / 'LMUDta'} is not a folder"):
        plugin.IVCPGrounding(dataset="RefCOCO_val")
    assert not (tmp_path / "LMUData").exists()
    (tmp_path / "LMUData").mkdir()
    assert lmudata_root({"LMUData": str(tmp_path / "LMUData")}) == tmp_path / "LMUData"


def test_a_work_dir_answers_one_data_file(tmp_path):
    """Outputs are keyed by the data file: the same file resumes, a replaced one (same name, same
    indices) is refused naming the files, a damaged prediction file is moved aside with its scores."""
    from ivcp.eval.rundata import check_work_dir, manifest_path, sha256

    lmu, work, model = tmp_path / "lmu", tmp_path / "work", "Qwen2.5-VL-Tiny"
    make_grounding(lmu, per_split=2, splits=("RefCOCO_val",))
    assert check_work_dir(work, [model], ["RefCOCO_val"], lmu) == ([], [])
    recorded = json.loads(manifest_path(work, model, "RefCOCO_val").read_text())
    assert recorded["sha256"] == sha256(lmu / "RefCOCO_val.tsv") and recorded["file"] == str(lmu / "RefCOCO_val.tsv")
    predictions = work / model / f"{model}_RefCOCO_val.xlsx"
    pd.DataFrame({"index": [0, 1], "prediction": ["a", "b"]}).to_excel(predictions, index=False)
    assert check_work_dir(work, [model], ["RefCOCO_val"], lmu) == ([], [])  # same data: resumes
    make_grounding(lmu, per_split=2, seed=9, splits=("RefCOCO_val",), force=True)  # new pictures, same indices
    errors, _ = check_work_dir(work, [model], ["RefCOCO_val"], lmu)
    assert len(errors) == 1 and f"the RefCOCO_val outputs answer {lmu / 'RefCOCO_val.tsv'} (sha256 " \
        f"{recorded['sha256'][:12]}" in errors[0] and str(predictions) in errors[0]
    assert json.loads(manifest_path(work, model, "RefCOCO_val").read_text()) == recorded  # nothing rewritten
    manifest_path(work, model, "RefCOCO_val").unlink()
    errors, _ = check_work_dir(work, [model], ["RefCOCO_val"], lmu)
    assert len(errors) == 1 and "with no record of the data they answer" in errors[0]
    # a prediction file cut short by a killed write, with the score file of an earlier evaluation
    predictions.unlink()
    assert check_work_dir(work, [model], ["RefCOCO_val"], lmu) == ([], [])
    whole = tmp_path / "whole.xlsx"
    pd.DataFrame({"index": [0, 1], "prediction": ["a", "b"]}).to_excel(whole, index=False)
    predictions.write_bytes(whole.read_bytes()[:300])
    (work / model / f"{model}_RefCOCO_val_acc.csv").write_text("split,Acc@0.5\nRefCOCO_val,50\n")
    errors, notes = check_work_dir(work, [model], ["RefCOCO_val"], lmu)
    assert errors == [] and len(notes) == 1 and str(predictions) in notes[0]
    assert not predictions.exists() and (work / model / f"{model}_RefCOCO_val.xlsx.damaged").is_file()
    assert not (work / model / f"{model}_RefCOCO_val_acc.csv").exists()


# --- statistics and resuming -----------------------------------------------------------------------

def _run_split(work: Path, name: str, interrupt_at: int | None = None, monkeypatch=None) -> pd.DataFrame:
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job

    dataset = build_dataset("RefCOCO_val")  # fresh: VLMEvalKit drops the image column of a finished run's data

    original = plugin.IVCPQwenVL.generate_inner
    if interrupt_at is not None:
        def interrupted(self, message, dataset=None):
            if plugin.IVCPQwenVL.calls >= interrupt_at:
                raise KeyboardInterrupt("stopped by the test")
            return original(self, message, dataset)

        monkeypatch.setattr(plugin.IVCPQwenVL, "generate_inner", interrupted)
    plugin.IVCPQwenVL.calls = 0
    try:
        infer_data_job(name, work_dir=str(work), model_name=name, dataset=dataset, verbose=False)
    finally:
        if interrupt_at is not None:
            monkeypatch.setattr(plugin.IVCPQwenVL, "generate_inner", original)
    return dataset.evaluate(str(next(work.glob(f"{name}_RefCOCO_val.xlsx"))))


def test_a_resumed_run_counts_every_sample_once(lmudata, tmp_path, monkeypatch):
    plugin.register()
    name = "Qwen2.5-VL-TinyGrounder_IVCP"
    clean_stats, resumed_stats = tmp_path / "clean_stats", tmp_path / "resumed_stats"
    monkeypatch.setenv("IVCP_STATS_DIR", str(clean_stats))
    (tmp_path / "clean").mkdir()
    clean = _run_split(tmp_path / "clean", name)
    monkeypatch.setenv("IVCP_STATS_DIR", str(resumed_stats))
    (tmp_path / "resumed").mkdir()
    with pytest.raises(KeyboardInterrupt):  # 11 answered and recorded, 10 saved by VLMEvalKit
        _run_split(tmp_path / "resumed", name, interrupt_at=11, monkeypatch=monkeypatch)
    with open(resumed_stats / name / "RefCOCO_val.jsonl", "a") as handle:
        handle.write('{"index": "11", "n_vis')  # a run killed while writing its statistics
    with pytest.warns(UserWarning, match="ignoring damaged line 12"):
        resumed = _run_split(tmp_path / "resumed", name)
    assert plugin.IVCPQwenVL.calls == 2  # only the unsaved samples ran again
    lines = (resumed_stats / name / "RefCOCO_val.jsonl").read_text().splitlines()
    assert len(lines) == 11 + 1 + 2  # sample 10 was recorded twice, the damaged line stays on its own
    assert json.loads(lines[-2])["index"] == "10" and json.loads(lines[-1])["index"] == "11"
    entries = stats.read(name, "RefCOCO_val", root=resumed_stats)
    assert sorted(entries, key=int) == [str(i) for i in range(12)]
    pd.testing.assert_frame_equal(clean, resumed)  # accuracy and Average Tokens, to full precision
    assert clean["avg_tokens"].iloc[0] == pytest.approx(0.5)


def _run_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ivcp_run_py", ROOT / "VLMEvalKit" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_models_run_on_one_thread_with_the_same_predictions(lmudata, monkeypatch):
    """run.py puts the embedded tiny models on one CPU thread (the harness's main speed-up on a busy
    machine), never a real checkpoint or a run whose OMP_NUM_THREADS was set; the tiny grounder's answers
    on one thread equal its answers on two, character for character, under every method of the main job."""
    import torch

    run_py, threads = _run_py(), torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        run_py._one_thread_for_offline_models(["Qwen2.5-VL-7B-Instruct_IVCP", "Qwen2.5-VL-TinyGrounder"])
        assert torch.get_num_threads() == 2  # a real checkpoint among the models: left alone
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        run_py._one_thread_for_offline_models(["Qwen2.5-VL-TinyGrounder_IVCP"])
        assert torch.get_num_threads() == 2  # the user's choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        run_py._one_thread_for_offline_models(["Qwen2.5-VL-TinyGrounder", "Qwen2.5-VL-TinyGrounder_IVCP"])
        assert torch.get_num_threads() == (2 if torch.cuda.is_available() else 1)

        from vlmeval.dataset import build_dataset

        dataset = build_dataset("RefCOCO_val")
        answers = {}
        for name in ("Qwen2.5-VL-TinyGrounder", "Qwen2.5-VL-TinyGrounder_FastV", "Qwen2.5-VL-TinyGrounder_PDrop",
                     "Qwen2.5-VL-TinyGrounder_VScan", "Qwen2.5-VL-TinyGrounder_IVCP"):
            model = _wrapper(name)
            model.set_dump_image(dataset.dump_image)
            for count in (2, 1):
                torch.set_num_threads(count)
                answers[name, count] = [model.generate(model.build_prompt(dataset.data.iloc[i], "RefCOCO_val"),
                                                       dataset="RefCOCO_val") for i in range(6)]
            assert answers[name, 1] == answers[name, 2], name
        assert len({tuple(a) for a in answers.values()}) > 1  # the methods answer differently: a real comparison
    finally:
        torch.set_num_threads(threads)


# --- the scripts ---------------------------------------------------------------------------------

def _script(name, args, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LMUData", "IVCP_STATS_DIR")}
    env.update(IVCP_WORK_DIR=str(tmp_path / "out"), PY=sys.executable, **env_extra)
    return subprocess.run(["bash", str(ROOT / "VLMEvalKit" / name), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_embedded_default_grounding_script(tmp_path):
    run = _script("test_ivcp_qwen_grounding.sh", [], {"PER_SPLIT": "2"}, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.split("Acc@0.5 (lenient parse)")[0].splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["vanilla", "fastv", "pdrop", "vscan", "ivc_prune"]
    assert table[1].split("|")[2].strip() == "100%"
    assert table[-1].split("|")[2].strip() == "50%"
    vanilla = [float(cell.split(" ± ")[0]) for cell in table[1].split("|")[3:-2]]  # the trained grounder really grounds
    assert all(cell.strip().endswith("(n=2)") for cell in table[1].split("|")[3:-2])  # ± SE over n pictures
    assert len(vanilla) == 8 and sum(vanilla) / len(vanilla) >= 85.0, table[1]
    assert (tmp_path / "out/results/grounding_Qwen2.5-VL-TinyGrounder.md").is_file()
    lenient = (tmp_path / "out/results/grounding_Qwen2.5-VL-TinyGrounder_lenient.md").is_file()
    assert lenient == ("Acc@0.5 (lenient parse)" in run.stdout)  # printed and written only where it differs
    assert "- budgets: visual KV kept (Average Tokens): " in run.stdout


def test_scripts_exit_non_zero_on_every_failure(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one = ["--data", "RefCOCO_val", "--methods", "vanilla", "--models", "Qwen2.5-VL-Tiny"]
    run = _script("test_ivcp_qwen_grounding.sh", one, {"LMUData": str(empty)}, tmp_path)
    assert run.returncode == 1 and "FAILED" in run.stderr and "Qwen2.5-VL-Tiny x RefCOCO_val" in run.stderr
    broken = tmp_path / "broken"
    make_grounding(broken, per_split=2, splits=("RefCOCO_val",), layout="authors")
    frame = pd.read_csv(broken / "RefCOCO_val.tsv", sep="\t").drop(columns=["height"])
    frame.to_csv(broken / "RefCOCO_val.tsv", sep="\t", index=False)
    run = _script("test_ivcp_qwen_grounding.sh", one, {"LMUData": str(broken)}, tmp_path)
    assert run.returncode == 1 and "missing column(s) height" in run.stdout + run.stderr
    assert not list((tmp_path / "out").rglob("*RefCOCO_val.xlsx"))  # failed before any inference
    run = _script("test_ivcp_qwen_grounding.sh", ["--models", "Qwen9-VL"], {"LMUData": str(empty)}, tmp_path)
    assert run.returncode == 2 and "unknown model 'Qwen9-VL'" in run.stderr
    for script in ("test_ivcp_qwen_generalvqa.sh", "test_ivcp_llava_generalvqa.sh"):
        run = _script(script, [], {}, tmp_path)
        assert run.returncode == 2 and "set LMUData" in run.stderr
    run = _script("test_ivcp_llava_generalvqa.sh", ["--methods", "vscan:Keep33"], {"LMUData": str(empty)}, tmp_path)
    assert run.returncode == 2 and "unknown budget 'vscan:Keep33'" in run.stderr  # VScan has no budget setting
    run = _script("test_ivcp_qwen_grounding.sh", ["--modles", "x"], {}, tmp_path)
    assert run.returncode == 2 and "unknown argument --modles" in run.stderr


def test_run_py_refuses_unknown_model_names(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "VLMEvalKit/run.py"), "--data", "RefCOCO_val", "--model", "Nope_IVCP",
                          "--work-dir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown model name(s): Nope_IVCP" in run.stderr


def test_run_py_refuses_a_mistyped_lmudata_and_grounding_without_a_prompt(tmp_path):
    env = dict(os.environ, LMUData=str(tmp_path / "LMUDta"), HOME=str(tmp_path))
    command = [sys.executable, str(ROOT / "VLMEvalKit/run.py"), "--data", "RefCOCO_val", "--work-dir", str(tmp_path / "w")]
    run = subprocess.run(command + ["--model", "InternVL-Tiny"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and f"run.py: LMUData={tmp_path / 'LMUDta'} is not a folder" in run.stderr
    assert not (tmp_path / "w" / "InternVL-Tiny").exists()  # nothing ran (VLMEvalKit itself makes ~/LMUData on import)
    run = subprocess.run(command + ["--model", "llava-1.5-Tiny"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "run.py: no grounding prompt for llava-1.5-Tiny (llava)" in run.stderr


@pytest.mark.parametrize("args,message", [
    (["--models"], "--models needs a value"),
    (["--methods", "--data", "RefCOCO_val"], "--methods needs a value"),
    (["--nproc", "abc"], "--nproc (or NPROC) must be a positive integer, got 'abc'"),
    (["--per-split", "0"], "--per-split (or PER_SPLIT) must be a positive integer, got '0'"),
])
def test_script_arguments_exit_2_with_one_line(tmp_path, args, message):
    run = _script("test_ivcp_qwen_grounding.sh", args, {}, tmp_path)
    assert (run.returncode, run.stderr) == (2, f"test_ivcp_qwen_grounding.sh: {message}\n")
    assert not (tmp_path / "out").exists()  # stopped before anything was made


def test_per_split_is_honoured_when_the_synthetic_folder_exists(tmp_path):
    make_grounding(tmp_path / "out" / "lmudata", per_split=1)  # an earlier embedded-default run's data
    run = _script("test_ivcp_qwen_grounding.sh", ["--per-split", "2", "--models", "Qwen9-VL"], {}, tmp_path)
    assert run.returncode == 2 and "unknown model 'Qwen9-VL'" in run.stderr  # stops after making the data
    rows = pd.read_csv(tmp_path / "out" / "lmudata" / "RefCOCO.tsv", sep="\t")
    assert len(rows) == 2 * 8
    run = _script("test_ivcp_qwen_grounding.sh", ["--per-split", "2"], {"LMUData": str(tmp_path)}, tmp_path)
    assert run.returncode == 2 and "does not apply with LMUData set" in run.stderr


def test_the_main_job_defaults_to_50_pictures_per_split_on_two_processes(tmp_path):
    """The embedded default answers 50 pictures per split (400 per method: ± 2-3 points per method's mean) on
    two CPU processes when neither --nproc nor NPROC says otherwise (docs/harness.md has the measured times)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PER_SPLIT", "NPROC"):
            patch.delenv(key, raising=False)
        run = _script("test_ivcp_qwen_grounding.sh", ["--models", "Qwen9-VL"], {}, tmp_path)
    assert run.returncode == 2 and "unknown model 'Qwen9-VL'" in run.stderr  # stops after making the data
    rows = pd.read_csv(tmp_path / "out" / "lmudata" / "RefCOCO.tsv", sep="\t")
    assert len(rows) == 8 * 50
    gpu = subprocess.run(["bash", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0
    if not gpu and (os.cpu_count() or 1) >= 2:
        assert "on 2 process(es)" in run.stdout
    run = _script("test_ivcp_qwen_grounding.sh", ["--models", "Qwen9-VL", "--nproc", "1"], {}, tmp_path)
    assert "on 1 process(es)" in run.stdout


def test_every_familys_grounding_script_runs_to_its_table(tmp_path):
    """InternVL's script (InternVL-Tiny, vanilla and IVC-Prune), the Qwen script for Qwen2-VL and
    Qwen3-VL and DeepSeek-VL2's (its tiny random model), end to end through VLMEvalKit to the tables (the trained Qwen2.5-VL grounder runs in
    test_embedded_default_grounding_script); then the TSV is replaced under the same name and
    indices, and the work dir's answers are refused instead of reused."""
    from ivcp.eval.rundata import sha256

    lmu = tmp_path / "lmu"
    make_grounding(lmu, per_split=2, splits=("RefCOCO_val",))
    digest = sha256(lmu / "RefCOCO_val.tsv")
    internvl = ["--data", "RefCOCO_val", "--models", "InternVL-Tiny", "--methods", "vanilla,ivc_prune"]
    run = _script("test_ivcp_internvl_grounding.sh", internvl, {"LMUData": str(lmu)}, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.split("Acc@0.5 (lenient parse)")[0].splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["vanilla", "ivc_prune"]
    shares = [line.split("|")[2].strip() for line in table[1:]]
    assert shares[0] == "100%" and shares[1] != "–" and float(shares[1].rstrip("%")) < 100
    assert f"- data RefCOCO_val: {lmu / 'RefCOCO_val.tsv'} (sha256 {digest})" in run.stdout
    run = _script("test_ivcp_qwen_grounding.sh", ["--data", "RefCOCO_val", "--models", "Qwen2-VL-Tiny Qwen3-VL-Tiny",
                                                  "--methods", "vanilla"], {"LMUData": str(lmu)}, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for model in ("Qwen2-VL-Tiny", "Qwen3-VL-Tiny"):
        assert f"Grounding, Acc@0.5 (the authors' strict metric): {model}" in run.stdout
        assert (tmp_path / f"out/results/grounding_{model}.csv").is_file()
    run = _script("test_ivcp_deepseek_grounding.sh", ["--data", "RefCOCO_val", "--models", "DeepSeek-VL2-Tiny-Random",
                                                      "--methods", "vanilla,ivc_prune"], {"LMUData": str(lmu)}, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.split("Acc@0.5 (lenient parse)")[0].splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["vanilla", "ivc_prune"]
    assert (tmp_path / "out/results/grounding_DeepSeek-VL2-Tiny-Random.csv").is_file()
    make_grounding(lmu, per_split=2, seed=7, splits=("RefCOCO_val",), force=True)  # new pictures, same indices
    run = _script("test_ivcp_internvl_grounding.sh", internvl, {"LMUData": str(lmu)}, tmp_path)
    assert run.returncode == 2 and "stale outputs" in run.stderr and digest[:12] in run.stderr
