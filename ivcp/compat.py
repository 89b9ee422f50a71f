"""What differs between the transformers versions ivcp supports (5.17 and later, unmodified).

5.24 renamed the KV cache from ``past_key_values`` to ``cache`` (forward keyword and output field; the
old names still work there, with a deprecation warning, until 5.40).
"""

from __future__ import annotations

import re
from typing import Any

import transformers


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string: "5.24.0" → (5, 24), "6.0rc1" → (6, 0)."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


CACHE_KWARG = "cache" if _version(transformers.__version__) >= (5, 24) else "past_key_values"
"""The name a forward takes the KV cache under: ``model(input_ids=..., **{CACHE_KWARG: cache})``."""


def cache_kwarg(kwargs: dict) -> Any:
    """The KV cache a forward received (under either name)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output) -> Any:
    """The KV cache a forward returned (under either name), or None."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None
