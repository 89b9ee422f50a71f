"""The transformers-version differences ivcp bridges."""

import inspect

import torch

from ivcp import compat
from ivcp.testing import make_image, make_inputs

from conftest import get_model


def test_the_cache_keyword_is_the_one_this_transformers_takes():
    model, processor = get_model("qwen2_5_vl")
    assert compat.CACHE_KWARG in inspect.signature(model.model.language_model.forward).parameters
    inputs = make_inputs(processor, "Hi", images=[make_image()])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = compat.output_cache(out)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1]
        step = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{compat.CACHE_KWARG: cache})
    assert compat.output_cache(step).get_seq_length() == inputs["input_ids"].shape[1] + 1
    assert compat.cache_kwarg({"past_key_values": cache}) is cache and compat.cache_kwarg({"cache": cache}) is cache
    assert compat.cache_kwarg({}) is None


def test_version_parse():
    assert compat._version("5.24.0") == (5, 24) and compat._version("5.17.0.dev0") == (5, 17)
    assert compat._version("6.0rc1") == (6, 0)
