"""The method classes are exported and act like their names: ivcp.prune(model, ivcp.IVCPrune(keep_ratio=0.5))."""

import pytest
import torch

import ivcp
from ivcp.testing import make_image, make_inputs

from conftest import get_model


def test_every_registered_method_is_exported_by_its_class():
    from ivcp.methods import method_class

    for name in ivcp.available_methods():
        cls = method_class(name)
        assert getattr(ivcp, cls.__name__) is cls
    assert sorted(ivcp.__all__) == sorted(ivcp._EXPORTS)
    assert all(getattr(ivcp, name) is not None for name in ivcp.__all__)


@pytest.mark.parametrize("name,cls", [("ivc_prune", "IVCPrune"), ("fastv", "FastV"), ("pdrop", "PDrop")])
def test_an_object_resolves_as_its_name(name, cls):
    """On LLaVA the configs change dataclass defaults (IVC-Prune keeps 0.3, FastV 0.25): an object built
    without arguments takes them as the name does; a field the caller passed is never overridden."""
    model, _ = get_model("llava")
    method = getattr(ivcp, cls)
    assert ivcp.resolve_method(model, method()) == ivcp.resolve_method(model, name)
    if name != "pdrop":
        by_name = ivcp.resolve_method(model, name)
        assert by_name.keep_ratio != 0.5  # the family's configs at work (0.3 / 0.25)
        assert ivcp.resolve_method(model, method(keep_ratio=0.5)) == ivcp.resolve_method(model, name, keep_ratio=0.5)
        assert ivcp.resolve_method(model, method(keep_ratio=0.5)).keep_ratio == 0.5


def test_prune_takes_an_object():
    model, processor = get_model("qwen2_5_vl")
    inputs = make_inputs(processor, "Where is it?", images=[make_image()])
    kept = []
    for method in (ivcp.IVCPrune(keep_ratio=0.25), "ivc_prune"):
        params = {} if isinstance(method, ivcp.PruningMethod) else {"keep_ratio": 0.25}
        with torch.no_grad(), ivcp.prune(model, method, **params) as session:
            model(**inputs)
        kept.append(session.last.kept.tolist())
    assert kept[0] == kept[1]
    assert session.last.n_visual_kept == round(0.25 * session.last.n_visual)
