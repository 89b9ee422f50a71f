"""Which pruning methods the vLLM plugin serves, and how many visual tokens each keeps.

vLLM's scheduler reserves KV slots for a prompt before the model runs, so the plugin's processor must
know each image's kept count before the selection (which runs later, inside the model): from its grid
alone, or — for the methods whose count is the size of an IVC set (``drop_ivc``, IVC tokens alone) —
from its grid and the M-RoPE id of its first token, which the processor reads off the prompt (the
IVC scores depend on positions only). A setting whose count depends on the picture is refused with a
clear error. Imports neither vLLM nor the HF engine.
"""

from __future__ import annotations

from typing import Any

from .. import config as _config
import torch

from ..methods import PruningMethod, make_method
from ..methods.drop_ivc import DropIVC
from ..methods.ivc_prune import IVCPrune
from ..methods.random import RandomPrune
from ..patterns import pattern_tokens
from ..adapters.base import RopeSpec
from ..scoring import count, ivc_scores, ivc_token_set, keep_count

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
SERVED = ("ivc_prune", "random", "drop_ivc")


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
        raise ValueError(f"ivcp's vLLM plugin serves {', '.join(SERVED)} (the methods that keep every token in layers "
                         f"before K, such as FastV and PDrop, are not served), not {method_obj.name!r}")
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
    return method_obj


def needs_position(method: PruningMethod | None) -> bool:
    """Whether ``method``'s kept count is the size of an IVC set (|top-k V ∪ top-k U|), which depends on where
    the image sits in the prompt: ``drop_ivc`` (N − |IVC|) and ``ivc_prune`` with the IVC tokens alone."""
    return isinstance(method, DropIVC) or (isinstance(method, IVCPrune) and not method.use_foreground
                                           and method.pattern == "ivc")


def full_grid_positions(base: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(3, gh·gw) M-RoPE ids of an image whose first token is at ``base``: (base, base + row, base + col)."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.stack([torch.zeros_like(rows), rows, cols]) + base


def kept_visual_count(method: PruningMethod, grid_h: int, grid_w: int, base: int | None = None,
                      rope: RopeSpec | None = None) -> int:
    """Visual tokens ``method`` keeps of an image of ``grid_h`` × ``grid_w`` merged tokens, known from the
    grid alone or (:func:`needs_position`) from the grid and ``base``, the M-RoPE id of the image's first
    token under ``rope``; ValueError where it would depend on the picture."""
    n = grid_h * grid_w
    if isinstance(method, RandomPrune):
        return keep_count(method.keep_ratio, n)
    if needs_position(method):
        if base is None or rope is None:
            raise ValueError(f"{method.name}: the kept count depends on the image's position in the prompt; "
                             "give its first token's M-RoPE id (base) and the rope")
        v, u = ivc_scores(full_grid_positions(base, grid_h, grid_w), rope, method.ivc_mode)
        ivc = ivc_token_set(v, u, method.ivc_ratio).numel()
        return n - ivc if isinstance(method, DropIVC) else ivc
    if isinstance(method, IVCPrune):
        if method.pattern == "ivc":
            positional = 2 * count(method.ivc_ratio, n)  # the IVC set's size is at most top-k(V) + top-k(U)
        else:
            positional = len(pattern_tokens(method.pattern, grid_h, grid_w, method.pattern_ratio))
        if not method.use_foreground:  # a fixed pattern (IVC alone: above; 'none' alone is refused by the method)
            return positional
        seeds = max(1, count(method.seed_ratio, n)) if method.foreground_stages == 2 else 0
        budget = keep_count(method.keep_ratio, n)
        if positional + seeds > budget:
            raise ValueError(f"ivc_prune: an image of {grid_h}x{grid_w} tokens keeps round(keep_ratio*N) = {budget} "
                             f"only if its positional tokens and seeds (up to {positional + seeds}) fit that budget; "
                             "raise keep_ratio or lower ivc_ratio / seed_ratio for the vLLM plugin")
        return budget
    raise ValueError(f"{method.name} is not served by ivcp's vLLM plugin")
