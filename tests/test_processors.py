"""Every tiny family's processor is a real transformers ``ProcessorMixin``: the chat template with tokenize=True gives
what the processor called by hand gives (and what the VLMEvalKit harness builds), save_pretrained + AutoProcessor
round-trips to the same inputs, and ``pipeline("image-text-to-text")`` answers as ``generate`` does, pruned or not.
Qwen and LLaVA use transformers' own classes (without torchvision the Qwen ones less their video half); InternVL and
DeepSeek-VL2 use ivcp's (``ivcp.models``), registered with the Auto classes; the converted checkpoints load them."""

import json

import pytest
import torch

import ivcp
from ivcp.testing import make_image, make_inputs, tiny_processor

from conftest import get_model

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava", "internvl", "deepseek_vl2")
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
           "llava": "LlavaProcessor", "internvl": "InternVLTilesProcessor", "deepseek_vl2": "DeepseekVL2Processor"}
QUESTION = "Where is it?"
IMAGE = make_image(224, 168, seed=5)
MESSAGES = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": QUESTION}]}]
IMAGE_TOKEN = {"qwen2_5_vl": "<|image_pad|>", "qwen2_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>", "llava": "<image>",
               "internvl": "<IMG_CONTEXT>", "deepseek_vl2": "<image>"}


def _chat(processor, messages=MESSAGES):
    return processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")


def _assert_same(got: dict, expected: dict, keys=None):
    keys = set(expected) if keys is None else keys
    assert keys <= set(got)
    for key in keys:
        assert torch.equal(got[key], expected[key]), key


def _expected_image_tokens(family: str, inputs: dict) -> int:
    """The image tokens of one 224 x 168 picture, from each family's rule."""
    if family.startswith("qwen"):
        return int(inputs["image_grid_thw"][0].prod()) // 4  # one token per 2 x 2 merged patches
    if family == "llava":
        return (112 // 14) ** 2  # resized + centre-cropped to 112 px, 14-px patches
    if family == "internvl":
        from ivcp.adapters.internvl import tile_grid

        cols, rows = tile_grid(168, 224, 1, 6)  # InternVL's tiling rule (ivcp's copy), then the thumbnail
        assert inputs["pixel_values"].shape[0] == cols * rows + 1
        return 16 * (cols * rows + 1)  # 16 per 64-px tile
    rows, cols = inputs["image_tiles"][0].tolist()  # DeepSeek-VL2: 3 x 3 tokens a tile, newline per row, separator
    return 3 * (3 + 1) + 1 + rows * 3 * (cols * 3 + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_real_processor_tokenizes_the_chat_like_the_two_step_path(family):
    import transformers

    processor = tiny_processor(family)
    assert isinstance(processor, transformers.ProcessorMixin)
    assert CLASSES[family] in [c.__name__ for c in type(processor).__mro__]  # (ImageOnly… without torchvision)
    chat = _chat(processor)
    two_step = make_inputs(processor, QUESTION, images=[IMAGE])
    _assert_same(chat, two_step)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    assert int((chat["input_ids"] == image_id).sum()) == _expected_image_tokens(family, chat)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_gives_the_same_class_and_the_same_inputs(family, tmp_path):
    """AutoProcessor, offline, no remote code. With the PIL backend the inputs are identical; by default
    transformers picks its torchvision image processor where there is one: the same resize, up to one 8-bit
    level on a few rounded pixels (2/255 after Qwen3-VL's 0.5 std, 1/255 / 0.229 after InternVL's). DeepSeek-VL2's
image processor has the PIL backend only."""
    from transformers import AutoImageProcessor, AutoProcessor

    processor = tiny_processor(family)
    processor.save_pretrained(tmp_path)
    before = _chat(processor)
    # (AutoProcessor's backend="pil" would ask Qwen's video processor for a PIL backend it lacks)
    pil = AutoProcessor.from_pretrained(tmp_path, image_processor=AutoImageProcessor.from_pretrained(tmp_path, backend="pil"))
    assert type(pil).__name__ == CLASSES[family]
    after = _chat(pil)
    assert set(after) == set(before)
    _assert_same(after, before)
    default = _chat(AutoProcessor.from_pretrained(tmp_path))
    for key in before:
        if key == "pixel_values":
            torch.testing.assert_close(default[key], before[key], atol=2.01 / 255 / 0.229, rtol=0)
            assert (default[key] - before[key]).abs().gt(1e-5).float().mean() < 1e-2
        else:
            assert torch.equal(default[key], before[key]), key


@pytest.mark.parametrize("family", ["internvl", "deepseek_vl2"])
def test_ivcps_processors_refuse_what_they_cannot_do(family):
    processor = tiny_processor(family)
    token = IMAGE_TOKEN[family]
    with pytest.raises(ValueError, match="2 images were given"):
        processor(text=token, images=[IMAGE, IMAGE])
    with pytest.raises(ValueError, match="images only"):
        processor(text=token, images=[IMAGE], videos=[[IMAGE, IMAGE]])
    with pytest.raises(TypeError, match="unexpected keyword arguments do_pan"):
        processor(text=token, images=[IMAGE], do_pan=True)


def test_deepseek_chat_template_is_chat_prompt():
    """The Jinja template renders as the harness's chat_prompt (the released ``deepseek`` format) on several
    conversations: answered turns, an empty answer, text-only, two images, surrounding whitespace."""
    from ivcp.models.deepseek_vl2_processor import chat_prompt

    processor = tiny_processor("deepseek_vl2")
    image = {"type": "image"}
    conversations = [
        [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
        [{"role": "user", "content": "  Say hello. "}],
        [{"role": "user", "content": [image, image, {"type": "text", "text": "Compare."}]},
         {"role": "assistant", "content": "The left one."}, {"role": "user", "content": "Why?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    ]
    for messages in conversations:
        for generation in (True, False):
            rendered = processor.apply_chat_template(messages, add_generation_prompt=generation)
            assert rendered == chat_prompt(messages, generation, processor.tokenizer.eos_token)
    with pytest.raises(Exception, match="user and assistant turns"):
        processor.apply_chat_template([{"role": "system", "content": "x"}])


def _harness(family: str, tmp_path):
    """The VLMEvalKit wrapper of ``family`` (its first registered entry without a method) on the tiny model, and one
    harness message: a 224 x 224 picture (a fixed point of every family's resize) and a question."""
    pytest.importorskip("vlmeval", reason="VLMEvalKit is the eval tier")
    from ivcp import vlmeval_plugin as plugin

    registry = plugin.model_registry()
    name = next(n for n, f in registry.items() if f.keywords["family"] == family and f.keywords.get("method") is None
                and f.keywords.get("protocol", "authors") == "authors")
    keywords = dict(registry[name].keywords, model_path=f"tiny:{family}")
    wrapper = registry[name].func(**keywords)
    path = tmp_path / "picture.png"
    make_image(224, 224, seed=9).save(path)
    return wrapper, [{"type": "image", "value": str(path)}, {"type": "text", "value": QUESTION}]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl", "deepseek_vl2"])
def test_the_chat_template_gives_what_the_harness_builds(family, tmp_path, monkeypatch):
    """The harness's inputs (its prompts are the authors'; VLMEvalKit's image loading) equal the chat template's with
    the same turn: Qwen's default system turn, InternVL's internvl2_5 system message written as a system turn,
    DeepSeek-VL2's released format. (LLaVA's harness text is the authors' Vicuna layout, not llava-hf's chat format.)"""
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    wrapper, message = _harness(family, tmp_path)
    harness, _ = wrapper.model_inputs(message, dataset="POPE")
    content = [{"type": "image", "path": message[0]["value"]}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    if family == "internvl":
        from ivcp.vlmeval_plugin import INTERNVL_SYSTEM

        messages = [{"role": "system", "content": INTERNVL_SYSTEM}] + messages
    chat = _chat(wrapper.processor, messages)
    _assert_same(chat, {k: v for k, v in harness.items() if torch.is_tensor(v)})


@pytest.mark.parametrize("family", FAMILIES + ("grounder",))
def test_the_image_text_to_text_pipeline_generates_as_generate_does(family):
    """Unpruned and inside ``ivcp.prune`` (IVC-Prune at half the visual tokens, which the session records)."""
    from transformers import pipeline

    messages = MESSAGES
    if family == "grounder":
        from ivcp.eval.grounding import grounding_prompt
        from ivcp.testing import tiny_grounder

        model, processor = tiny_grounder()
        messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                                 {"type": "text", "text": grounding_prompt("the red circle")}]}]
    else:
        model, processor = get_model(family)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    inputs = _chat(processor, messages)
    new = 12 if family == "grounder" else 4

    def both():
        answer = pipe(text=messages, max_new_tokens=new, return_full_text=False)[0]["generated_text"]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
        return answer, processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    answer, expected = both()
    assert answer == expected
    with ivcp.prune(model, "ivc_prune", keep_ratio=0.5) as session:
        pruned, expected_pruned = both()
    assert pruned == expected_pruned
    record = session.last
    assert 0 < record.n_visual_kept < record.n_visual


def test_without_torchvision_the_processor_is_the_same_class_less_its_videos(tmp_path):
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


def test_every_processor_saves_and_loads_without_torchvision():
    """With torchvision absent (the core install; simulated by a None entry in sys.modules, which import and
    find_spec both honour), every family's processor builds, tokenizes the chat, saves, and loads back to identical
    inputs: AutoProcessor for LLaVA, InternVL and DeepSeek-VL2 (PIL image processors), and for Qwen — whose stock
    classes AutoProcessor cannot build without their video processor — the same class less its videos
    (``ivcp.testing.qwen.image_only(cls).from_pretrained``)."""
    import subprocess
    import sys

    code = ("import sys, tempfile\n"
            "sys.modules['torchvision'] = None\n"
            "import torch, transformers\n"
            "from transformers import AutoProcessor\n"
            "from ivcp.testing import make_image, tiny_processor\n"
            "from ivcp.testing.qwen import image_only\n"
            f"classes = {CLASSES!r}\n"
            "messages = [{'role': 'user', 'content': [{'type': 'image', 'image': make_image(224, 168, seed=5)},\n"
            "                                         {'type': 'text', 'text': 'Where?'}]}]\n"
            "for family, name in classes.items():\n"
            "    p = tiny_processor(family); d = tempfile.mkdtemp(); p.save_pretrained(d)\n"
            "    q = image_only(getattr(transformers, name)).from_pretrained(d) if family.startswith('qwen') else \\\n"
            "        AutoProcessor.from_pretrained(d)\n"
            "    a, b = (x.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,\n"
            "                                  return_tensors='pt') for x in (p, q))\n"
            "    same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)\n"
            "    print(family, name in [c.__name__ for c in type(q).__mro__], same, 'Pil' in type(q.image_processor).__name__\n"
            "          or family == 'deepseek_vl2')\n"
            "print(sys.modules['torchvision'] is None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"{family} True True True" for family in CLASSES] + ["True"]


def test_converted_internvl_folder_loads_ivcps_processor_with_the_harness_chat(tmp_path):
    """scripts/convert_internvl.py writes InternVLTilesProcessor's config and the remote chat()'s template: after
    ``import ivcp.models`` AutoProcessor loads it (and load_model gives it); the chat template with an image renders
    the harness's text (the internvl2_5 system message) and tokenizes as the processor does by hand."""
    from transformers import AutoProcessor

    import ivcp.models  # noqa: F401
    from ivcp.loading import load_model
    from ivcp.models import InternVLTilesProcessor

    import sentencepiece as spm

    from test_convert_internvl import _converter, remote_checkpoint

    remote_checkpoint(tmp_path / "remote")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "remote" / "tokenizer.model"))
    context = sp.piece_to_id("<IMG_CONTEXT>")  # the model's image token is the tokenizer's, as in the released ones
    assert _converter().main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "native"),
                              "--image-token-id", str(context)]) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "native", backend="pil")
    assert type(processor) is InternVLTilesProcessor and processor.image_seq_length == 16
    assert processor.image_token_id == context
    system = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    chat = _chat(processor)
    by_hand = processor(text=text, images=[IMAGE], return_tensors="pt")
    _assert_same(chat, by_hand)
    assert int(chat["input_ids"][0, 0]) == processor.tokenizer.bos_token_id  # InternLM2: BOS first
    tiles = chat["pixel_values"].shape[0]
    assert int((chat["input_ids"] == context).sum()) == 16 * tiles and chat["image_sizes"].tolist() == [[168, 224]]
    model, loaded = load_model(str(tmp_path / "native"), device="cpu", processor_kwargs={"backend": "pil"})
    assert type(loaded) is InternVLTilesProcessor
    with torch.no_grad():
        model(**chat)


def test_converted_deepseek_folder_loads_with_autoprocessor(tmp_path):
    """scripts/convert_deepseek_vl2.py writes DeepseekVL2Processor's config: AutoProcessor loads it, giving the inputs
    of the tiny processor's settings; a folder converted before (ivcp_processor_config.json) still loads."""
    from transformers import AutoProcessor

    from ivcp.models import DeepseekVL2Processor
    from ivcp.testing import deepseek_vl2 as tiny

    from test_convert_deepseek_vl2 import _converter, remote_folder

    remote_folder(tmp_path / "remote")
    assert _converter().main(["--src", str(tmp_path / "remote"), "--out", str(tmp_path / "native")]) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "native")
    assert type(processor) is DeepseekVL2Processor
    assert (processor.tile_size, processor.tokens_per_side) == (tiny.TILE, 3)
    chat = _chat(processor)
    reference = tiny.tiny_processor()
    expected = reference(text=reference.apply_chat_template(MESSAGES), images=[IMAGE])
    for key in ("pixel_values", "image_tiles", "image_sizes"):
        assert torch.equal(chat[key], expected[key]), key
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((chat["input_ids"] == image_id).sum()) == _expected_image_tokens("deepseek_vl2", chat)
    # the older layout: the settings in ivcp_processor_config.json, no processor_config.json
    legacy = tmp_path / "legacy"
    processor.tokenizer.save_pretrained(legacy)
    image_processor = processor.image_processor
    (legacy / "ivcp_processor_config.json").write_text(json.dumps(dict(
        tile_size=image_processor.tile_size, patch_size=processor.patch_size, downsample_ratio=processor.downsample_ratio,
        candidate_resolutions=image_processor.candidate_resolutions, max_tiled_images=processor.max_tiled_images,
        image_mean=image_processor.image_mean, image_std=image_processor.image_std)))
    _assert_same(_chat(DeepseekVL2Processor.from_pretrained(legacy)), chat)
