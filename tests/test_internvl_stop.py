"""The InternVL wrapper stops where the authors' remote chat() stops (modeling_internvl_chat.py): generation
ends at <|im_end|> (its eos_token_id) and the reply is cut there."""

import pytest
import torch

pytest.importorskip("vlmeval")

from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from ivcp import vlmeval_plugin as plugin  # noqa: E402
from ivcp.testing import make_image  # noqa: E402


def _tiny(name: str):
    factory = plugin.model_registry()[name]
    keywords = dict(factory.keywords, model_path=f"tiny:{factory.keywords['family']}")
    return factory.func(**dict(keywords, generation={"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.0}))


@pytest.mark.parametrize("name", ["InternVL2_5-8B", "InternVL2_5-8B_FastV"])
def test_generation_stops_at_im_end_and_the_reply_is_cut(tmp_path, monkeypatch, name):
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    model = _tiny(name)
    tokenizer = model.processor.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generate_kwargs["eos_token_id"] == im_end
    words = tokenizer("yes", add_special_tokens=False).input_ids

    class SayThenEnd(LogitsProcessor):  # the model answers "yes", then <|im_end|>, then would go on
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_length[0]
            forced = words[step] if step < len(words) else im_end if step == len(words) else words[0]
            scores = torch.full_like(scores, -1e9)
            scores[:, forced] = 0
            return scores

    outputs, prompt_length = [], []
    generate = model.model.generate

    def recording_generate(**kwargs):
        prompt_length.append(kwargs["input_ids"].shape[1])
        out = generate(**kwargs, logits_processor=LogitsProcessorList([SayThenEnd()]))
        outputs.append(out)
        return out

    monkeypatch.setattr(model.model, "generate", recording_generate)
    # as in a checkpoint whose own configs end turns elsewhere (InternLM2's </s>): only the wrapper's stop applies
    monkeypatch.setattr(model.model.generation_config, "eos_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    monkeypatch.setattr(model.model.config.text_config, "eos_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    image = tmp_path / "p.png"
    make_image(128, 96).save(image)
    answer = model.generate_inner([dict(type="image", value=str(image)), dict(type="text", value="Is it red?")],
                                  dataset="POPE")
    new = outputs[0][0, prompt_length[0]:].tolist()
    assert new == words + [im_end]  # stopped at <|im_end|>
    assert answer == "yes"


def test_decode_cuts_at_the_first_im_end():
    model = _tiny("InternVL2_5-8B")
    tokenizer = model.processor.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = tokenizer("ok", add_special_tokens=False).input_ids + [im_end] + tokenizer("more", add_special_tokens=False).input_ids
    assert model.decode(torch.tensor(tokens)) == "ok"
