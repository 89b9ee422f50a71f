"""ivcp: training-free visual-token pruning for vision-language models, built around IVC-Prune.

    import ivcp
    with ivcp.prune(model, "ivc_prune", keep_ratio=0.5) as session:   # or ivcp.IVCPrune(keep_ratio=0.5)
        out = model.generate(**inputs, max_new_tokens=64)
    session.last.n_visual_kept, session.last.kv_lengths      # a batch: session.last[b].kv_lengths

The names below are imported on first use, so ``import ivcp`` (and ``ivcp --help``) loads neither
torch nor transformers until something needs them.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = _metadata.version("ivcp")  # the one place: pyproject.toml's version
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout that is not installed
    __version__ = "0+unknown"

# public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(["ModelAdapter", "RopeSpec", "Segment", "available_adapters", "register_adapter"], ".adapters"),
    "collate": ".batching",
    **dict.fromkeys(["BatchRecord", "PrefillRecord", "PruneSession", "SelectionContext", "prune", "resolve_method"],
                    ".engine"),
    **dict.fromkeys(["PruningMethod", "available_methods", "make_method", "register_method",
                     # the method classes: ivcp.prune(model, ivcp.IVCPrune(keep_ratio=0.5))
                     "AdaptPrune", "DropIVC", "FastV", "IVCPrune", "IVCUnion", "PDrop", "RandomPrune", "VScan",
                     "WindowFastV"], ".methods"),
}
_SUBMODULES = {"adapters", "analytic", "batching", "bench", "compat", "config", "data", "engine", "eval", "layout",
               "loading", "methods", "patterns", "results", "scoring", "testing", "viz"}

__all__ = [  # = sorted(_EXPORTS), written out for static tools (tests/test_cli.py checks they agree)
    "AdaptPrune", "BatchRecord", "DropIVC", "FastV", "IVCPrune", "IVCUnion", "ModelAdapter", "PDrop", "PrefillRecord",
    "PruneSession", "PruningMethod", "RandomPrune", "RopeSpec", "Segment", "SelectionContext", "VScan", "WindowFastV",
    "available_adapters", "available_methods", "collate", "make_method", "prune", "register_adapter", "register_method",
    "resolve_method",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ivcp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above load on first use
    from .adapters import ModelAdapter, RopeSpec, Segment, available_adapters, register_adapter
    from .batching import collate
    from .engine import BatchRecord, PrefillRecord, PruneSession, SelectionContext, prune, resolve_method
    from .methods import (AdaptPrune, DropIVC, FastV, IVCPrune, IVCUnion, PDrop, PruningMethod, RandomPrune, VScan,
                          WindowFastV, available_methods, make_method, register_method)
