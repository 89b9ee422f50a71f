import functools

import pytest
import torch

from ivcp.testing import make_image, make_inputs, tiny_model

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _grad_mode_is_kept():
    """Importing VLMEvalKit's models turns gradients off for the whole process; keep each test's start equal."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str, layers: int | None = None):
    """The tiny model of a family (its own depth: 4 layers, Qwen3-VL 5) with ``attn`` attention."""
    return tiny_model(family, attn_implementation=attn, **({} if layers is None else {"num_hidden_layers": layers}))


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def family(request):
    return request.param


@pytest.fixture
def model_and_processor(family):
    return _model(family, "sdpa")


def get_model(family: str, attn: str = "sdpa", layers: int | None = None):
    return _model(family, attn, layers)


@pytest.fixture
def one_image_inputs(model_and_processor):
    _, processor = model_and_processor
    return make_inputs(processor, "Where is the red square? Answer briefly.", images=[make_image()])
