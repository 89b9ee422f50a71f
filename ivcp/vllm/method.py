"""Which pruning methods the vLLM plugin serves, and how many visual tokens each keeps.

vLLM's scheduler reserves KV slots for a prompt before the model runs, so the plugin's processor must
know each image's kept count from its grid alone (the selection itself runs later, inside the model).
That holds for the methods below; a setting whose count depends on the picture is refused with a
clear error. Imports neither vLLM nor the HF engine.
"""

from __future__ import annotations

from typing import Any

from .. import config as _config
from ..methods import PruningMethod, make_method
from ..methods.ivc_prune import IVCPrune
from ..methods.random import RandomPrune
from ..patterns import pattern_tokens
from ..scoring import count, keep_count

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
SERVED = ("ivc_prune", "random")


def resolve(family: str, num_layers: int, hidden_size: int, method: str | PruningMethod,
            params: dict[str, Any] | None = None) -> PruningMethod:
    """The method object for a model of ``family``: defaults from configs/, validated with
    :mod:`ivcp.prune`'s own errors, then checked against what the plugin can serve exactly."""
    if family not in FAMILIES:
        raise ValueError(f"ivcp's vLLM plugin serves {', '.join(FAMILIES)}, not {family!r}")
    method_obj = make_method(method, **(params or {}))
    method_obj = method_obj.resolve(lambda name: _config.method_defaults(family, name, num_layers, hidden_size))
    method_obj.validate(num_layers)
    if method_obj.name not in SERVED:
        raise ValueError(f"ivcp's vLLM plugin serves {', '.join(SERVED)} (drop_ivc and the methods that keep every "
                         f"token in layers before K, such as FastV and PDrop, are not served), not {method_obj.name!r}")
    if len(method_obj.selection_layers()) != 1:
        raise ValueError(f"{method_obj.name}: the vLLM plugin runs one selection layer, got {method_obj.selection_layers()}")
    layer = method_obj.selection_layers()[0]
    if list(method_obj.trimmed_layers(layer)) != list(range(layer)):
        raise ValueError(f"{method_obj.name}: the vLLM plugin needs every layer's KV cut to the kept tokens "
                         "(a paged cache holds one length per request); trim_layer0_kv=False is not served")
    if isinstance(method_obj, IVCPrune):
        if method_obj.foreground_source != "unit":
            raise ValueError("ivc_prune: the vLLM plugin serves foreground_source='unit' only")
        if method_obj.use_foreground and method_obj.budget_mode != "reference_fill":
            raise ValueError(f"ivc_prune: with budget_mode={method_obj.budget_mode!r} the kept count depends on the "
                             "picture, which vLLM's scheduler must know beforehand; use budget_mode='reference_fill'")
        if not method_obj.use_foreground and method_obj.pattern in ("ivc", "none"):
            raise ValueError(f"ivc_prune: pattern={method_obj.pattern!r} without foreground is not served by the vLLM plugin")
    return method_obj


def kept_visual_count(method: PruningMethod, grid_h: int, grid_w: int) -> int:
    """Visual tokens ``method`` keeps of an image of ``grid_h`` × ``grid_w`` merged tokens, known from the
    grid alone; ValueError where it would depend on the picture."""
    n = grid_h * grid_w
    if isinstance(method, RandomPrune):
        return keep_count(method.keep_ratio, n)
    if isinstance(method, IVCPrune):
        if method.pattern == "ivc":
            positional = 2 * count(method.ivc_ratio, n)  # the IVC set's size is at most top-k(V) + top-k(U)
        else:
            positional = len(pattern_tokens(method.pattern, grid_h, grid_w, method.pattern_ratio))
        if not method.use_foreground:  # fixed patterns only (resolve refuses ivc / none here)
            return positional
        seeds = max(1, count(method.seed_ratio, n)) if method.foreground_stages == 2 else 0
        budget = keep_count(method.keep_ratio, n)
        if positional + seeds > budget:
            raise ValueError(f"ivc_prune: an image of {grid_h}x{grid_w} tokens keeps round(keep_ratio*N) = {budget} "
                             f"only if its positional tokens and seeds (up to {positional + seeds}) fit that budget; "
                             "raise keep_ratio or lower ivc_ratio / seed_ratio for the vLLM plugin")
        return budget
    raise ValueError(f"{method.name} is not served by ivcp's vLLM plugin")
