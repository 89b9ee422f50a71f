"""ivcp: training-free visual-token pruning for vision-language models, built around IVC-Prune.

    import ivcp
    with ivcp.prune(model, "ivc_prune", keep_ratio=0.5) as session:
        out = model.generate(**inputs, max_new_tokens=64)
    session.last.n_visual_kept, session.last.kv_lengths      # a batch: session.last[b].kv_lengths
"""

from .adapters import ModelAdapter, RopeSpec, Segment, available_adapters, register_adapter
from .batching import collate
from .engine import BatchRecord, PrefillRecord, PruneSession, SelectionContext, prune, resolve_method
from .methods import PruningMethod, available_methods, make_method, register_method

__version__ = "0.1.0"

__all__ = [
    "BatchRecord", "ModelAdapter", "PrefillRecord", "PruneSession", "PruningMethod", "RopeSpec", "Segment", "SelectionContext",
    "available_adapters", "available_methods", "collate", "make_method", "prune", "register_adapter", "register_method",
    "resolve_method",
]
