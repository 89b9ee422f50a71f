"""The DeepSeek-VL2 wrapper of the VLMEvalKit plugin: the text the model receives equals what VLMEvalKit's own
DeepSeekVL2 wrapper builds (its ``prepare_inputs``, the oracle) rendered in the released ``deepseek`` chat format
(written out here), for the Table 2 benchmarks and for grounding; the grounding answer format in both metrics."""

import pytest

pytest.importorskip("vlmeval", reason="VLMEvalKit is the eval tier")

from vlmeval.vlm.deepseek_vl2 import DeepSeekVL2  # noqa: E402

from ivcp import vlmeval_plugin as plugin  # noqa: E402
from ivcp.eval import stats  # noqa: E402
from ivcp.eval.grounding import FAMILY_CONVENTION, paper_prediction, parse_box  # noqa: E402

from test_vlmeval_plugin import TABLE2, _received, _wrapper, lmudata, table2  # noqa: E402,F401

GENERATION = {"max_new_tokens": 1, "do_sample": False, "repetition_penalty": 1.0}


def _released_format(conversation) -> str:
    """The released processor's deepseek template: role + ": " + stripped content, "\\n\\n" after a user turn, an
    empty assistant turn as role + ":", the whole stripped; no system prompt."""
    out = ""
    for turn in conversation:
        content = turn["content"].strip()
        out += f"{turn['role']}: {content}\n\n" if content else f"{turn['role']}:"
    return out.strip()


def test_names_and_settings_are_registered():
    plugin.register()
    from vlmeval.config import supported_VLM

    small = supported_VLM["deepseek-vl2-small_IVCP"].keywords
    assert (small["family"], small["method"], small["generation"]["max_new_tokens"]) == ("deepseek_vl2", "ivc_prune", 2048)
    for suffix in ("", "_FastV", "_WFastV", "_PDrop", "_VScan", "_AdaptPrune", "_Random", "_IVCPStage1", "_DatasetPrompt"):
        assert "deepseek-vl2-small" + suffix in supported_VLM


def test_prompts_are_vlmevalkits_deepseek_vl2_wrapper(table2):  # noqa: F811 (the fixture imported above)
    model = _wrapper("DeepSeek-VL2-Tiny-Random_IVCP", generation=GENERATION)
    for name in TABLE2:
        message, received = _received(model, table2[name], table2[name].data.iloc[0], name)
        conversation = DeepSeekVL2.prepare_inputs(None, message, dataset=name)
        assert received == _released_format(conversation), name
        assert received.startswith("<|User|>: <image>\n") and received.endswith("\n\n<|Assistant|>:")
    # a 300 x 200 picture: 3 x 2 tiles by the released rule (3 x 3 tokens each on the tiny model), pruned
    entry = stats.read(model.name, "POPE")["7"]
    assert entry["n_visual"] == 3 * 3 + 2 * 3 * (3 * 3) and entry["n_visual_kept"] < entry["n_visual"]


def test_grounding_prompt_and_answer_format(lmudata):  # noqa: F811 (the fixture imported above)
    from vlmeval.dataset import build_dataset

    plugin.register()
    dataset = build_dataset("RefCOCO_val")
    line = dataset.data.iloc[0].copy()
    line["question"] = "the red circle"
    model = _wrapper("deepseek-vl2-small_FastV", generation=GENERATION)
    message, received = _received(model, dataset, line, "RefCOCO_val")
    assert received == "<|User|>: <image>\nLocate <|ref|>the red circle<|/ref|> in the given image.\n\n<|Assistant|>:"
    answer = "<|ref|>the red circle<|/ref|><|det|>[[100, 200, 599, 999]]<|/det|>"
    # the lenient parse: 0–999 of the original image (DeepSeek-VL2's own drawing code divides by 999)
    box = parse_box(answer, FAMILY_CONVENTION["deepseek_vl2"], (999, 500)).box
    assert box == pytest.approx((100.0, 200 * 500 / 999, 599.0, 500.0))
    # the authors' metric: their extract_and_normalize_coordinates, / 1000
    assert paper_prediction(answer, "deepseek_vl2") == pytest.approx((0.1, 0.2, 0.599, 0.999))
