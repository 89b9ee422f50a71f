"""The tiny Qwen-family processors are transformers' own classes: chat template with tokenize=True, save and
load, the image-text-to-text pipeline; without torchvision the same class less its video half."""

import pytest
import torch

from ivcp.testing import make_image, make_inputs, tiny_processor

from conftest import get_model

CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
MESSAGES = [{"role": "user", "content": [{"type": "image", "image": make_image(224, 168, seed=5)},
                                         {"type": "text", "text": "Where is it?"}]}]


def _chat(processor):
    return processor.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")


@pytest.mark.parametrize("family", list(CLASSES))
def test_a_real_processor_tokenizes_the_chat_like_the_two_step_path(family):
    import transformers

    processor = tiny_processor(family)
    assert isinstance(processor, getattr(transformers, CLASSES[family]))
    assert isinstance(processor, transformers.ProcessorMixin)
    chat = _chat(processor)
    two_step = make_inputs(processor, "Where is it?", images=[make_image(224, 168, seed=5)])
    assert set(two_step) <= set(chat)
    for key in two_step:
        assert torch.equal(chat[key], two_step[key]), key
    grid = chat["image_grid_thw"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((chat["input_ids"] == image_id).sum()) == int(grid.prod()) // 4  # one token per 2 x 2 merged patches


@pytest.mark.parametrize("family", list(CLASSES))
def test_save_and_load_gives_the_stock_class_and_the_same_inputs(family, tmp_path):
    from transformers import AutoProcessor

    processor = tiny_processor(family)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == CLASSES[family]
    before, after = _chat(processor), _chat(loaded)
    assert set(before) == set(after)
    for key in before:
        if key == "pixel_values":  # AutoProcessor picks the torchvision image processor: the same resize, up to
            # one 8-bit level on a few rounded pixels (2/255 after Qwen3-VL's 0.5 std)
            torch.testing.assert_close(after[key], before[key], atol=2.01 / 255, rtol=0)
            assert (after[key] - before[key]).abs().gt(1e-5).float().mean() < 1e-3
        else:
            assert torch.equal(after[key], before[key]), key


def test_the_image_text_to_text_pipeline_generates_as_generate_does():
    from transformers import pipeline

    model, processor = get_model("qwen2_5_vl")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    answer = pipe(text=MESSAGES, max_new_tokens=4, return_full_text=False)[0]["generated_text"]
    inputs = _chat(processor)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answer == processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_without_torchvision_the_processor_is_the_same_class_less_its_videos(tmp_path):
    import json

    from transformers import Qwen2_5_VLProcessor

    from ivcp.testing.qwen import image_only

    full = tiny_processor("qwen2_5_vl")
    lean = image_only(Qwen2_5_VLProcessor)(image_processor=full.image_processor, tokenizer=full.tokenizer,
                                           chat_template=full.chat_template)
    assert isinstance(lean, Qwen2_5_VLProcessor) and lean.video_processor is None
    for key, value in _chat(full).items():
        assert torch.equal(_chat(lean)[key], value), key
    with pytest.raises(ValueError, match="has no video processor"):
        lean(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[[make_image()] * 2])
    lean.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
