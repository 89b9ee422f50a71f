"""The base class every pruning method derives from.

A method is a dataclass of its parameters plus one selection function. It sees the prompt only
through a :class:`~ivcp.selection.SelectionContext` (segments, positions, value vectors, attention rows)
and returns which visual tokens to keep; the engine does everything else (hooks, slicing, cache).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.base import Segment
    from ..selection import SelectionContext


@dataclass
class PruningMethod:
    """Base of all methods.

    Class attributes a method sets:
    - ``name``: registry name.
    - ``trims_earlier_layers``: True → after selection at layer K, the KV cache of layers < K is cut
      to the kept set too (IVC-Prune); False → layers < K keep their full cache (FastV-style).

    - ``bounds``: documented ranges of numeric fields, e.g. ``{"window": ">= 1", "sigma": "> 0"}``
      (``*_ratio`` / ``*_ratios`` fields are always in [0, 1]).
    - ``source``: where the method's rules come from (paper, upstream files) and every deviation, per
      family where they differ; ``ivcp methods --explain NAME`` prints it.

    Fields left ``None`` are filled from ``configs/`` for the model at hand (see :mod:`ivcp.config`);
    for a method made by name, so is every field the caller did not pass. Every other value is checked
    against its field's type and range when the method is built (a string "false" is not a bool).
    """

    name: ClassVar[str] = ""
    trims_earlier_layers: ClassVar[bool] = False
    # 0 for methods that also act before the LLM (their layer-0 stage reads the vision tower)
    min_selection_layer: ClassVar[int] = 1
    bounds: ClassVar[dict[str, str]] = {}
    source: ClassVar[str] = ""

    selection_layer: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A method's own ``__post_init__`` (it may normalise values) is followed by the parameter check."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_parameters", False):
            @functools.wraps(own)
            def post_init(self, *args: Any, **kw: Any) -> None:
                own(self, *args, **kw)
                self.check_parameters()
            post_init._checks_parameters = True  # type: ignore[attr-defined]
            cls.__post_init__ = post_init

    def __post_init__(self) -> None:
        self.check_parameters()

    def check_parameters(self) -> None:
        """Raise a one-line ValueError naming the first field whose value has the wrong type or lies
        outside its documented range (``None`` passes: configs fill it, :meth:`validate` checks it)."""
        hints = _field_types(type(self))
        bounds: dict[str, str] = {}
        for klass in reversed(type(self).__mro__):
            bounds.update(klass.__dict__.get("bounds", {}))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            ratios = value if f.name.endswith("_ratios") and isinstance(value, (tuple, list)) else \
                [value] if f.name.endswith("_ratio") else []
            for ratio in ratios:
                if isinstance(ratio, bool) or not (isinstance(ratio, numbers.Real) and 0.0 <= ratio <= 1.0):
                    raise ValueError(f"{self.name}: parameter {f.name} must be in [0, 1], got {value!r}")
            expected = hints.get(f.name, Any)
            if not _matches(value, expected):
                raise ValueError(f"{self.name}: parameter {f.name} must be {_describe(expected)}, got {value!r}")
            if f.name in bounds and isinstance(value, numbers.Real) and not isinstance(value, bool):
                op, limit = bounds[f.name].split()
                if not _COMPARE[op](value, float(limit)):
                    raise ValueError(f"{self.name}: parameter {f.name} must be {bounds[f.name]}, got {value!r}")

    # --- schedule ---------------------------------------------------------------------------
    def selection_layers(self) -> list[int]:
        """Layers K (0-based) before which a selection runs, ascending."""
        return [self.selection_layer]

    def trimmed_layers(self, layer: int) -> range:
        """Layers before the selection ``layer`` whose KV cache is cut to the kept tokens: all of them
        when ``trims_earlier_layers``, none otherwise."""
        return range(layer) if self.trims_earlier_layers else range(0)

    def vision_blocks(self, adapter) -> list[int]:
        """Vision-tower blocks whose attention the method reads (``ctx.vision_attention``)."""
        return []

    # --- selection --------------------------------------------------------------------------
    def select(self, ctx: "SelectionContext") -> torch.Tensor:
        """Global input-sequence indices of the visual tokens to keep (any order).

        The default runs :meth:`select_segment` on every segment (each image / video frame gets its
        own budget)."""
        kept = [seg.at(self.select_segment(ctx, seg)) for seg in ctx.segments]
        return torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)

    def select_segment(self, ctx: "SelectionContext", segment: "Segment") -> torch.Tensor:
        """Local indices (0..N−1) of the tokens of ``segment`` to keep."""
        raise NotImplementedError(f"{type(self).__name__} must implement select or select_segment")

    # --- parameters -------------------------------------------------------------------------
    def with_defaults(self, defaults: dict) -> "PruningMethod":
        """A copy whose fields take values from ``defaults`` (unknown keys are ignored) unless the
        caller set them: ``None`` fields always, and, for a method made by name
        (:func:`~ivcp.methods.registry.make_method`), every field the caller did not pass — so a
        family's configs can change a dataclass default (e.g. FastV's keep ratio on LLaVA)."""
        names = {f.name for f in dataclasses.fields(self)}
        explicit = getattr(self, "_explicit", None)
        filled = {k: v for k, v in defaults.items() if k in names and
                  (getattr(self, k) is None or (explicit is not None and k not in explicit))}
        out = dataclasses.replace(self, **filled)
        if explicit is not None:
            out._explicit = explicit
        return out

    def resolve(self, lookup) -> "PruningMethod":
        """A copy with model-dependent defaults filled; ``lookup(method_name)`` gives a method's
        defaults for the model at hand (wrappers resolve what they wrap too)."""
        return self.with_defaults(lookup(self.name))

    def validate(self, num_layers: int) -> None:
        """Raise ValueError naming the first bad parameter (called before any compute)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                raise ValueError(f"{self.name}: parameter {f.name} has no value and no default for this model; "
                                 f"pass {f.name}=...")
        self.check_parameters()
        for layer in self.selection_layers():
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ValueError(f"{self.name}: selection layer must be an int, got {layer!r}")
            if not self.min_selection_layer <= layer < num_layers:
                raise ValueError(f"{self.name}: selection layer {layer} is out of range for a model with "
                                 f"{num_layers} layers (it must be in [{self.min_selection_layer}, {num_layers - 1}])")
        layers = self.selection_layers()
        if layers != sorted(set(layers)):
            raise ValueError(f"{self.name}: selection layers must be strictly increasing, got {layers}")

    def describe(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


def check_choice(method: str, name: str, value: object, choices: tuple) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{method}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


_COMPARE = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved type hints of a method class's fields."""
    return typing.get_type_hints(cls)


def _matches(value: object, expected: Any) -> bool:
    """Whether ``value`` fits the annotation ``expected`` (bool is neither int nor float; an int is a float;
    a list passes for a tuple; annotations this does not know accept anything)."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    """An annotation in words: ``int | None`` → "an int", ``tuple[float, ...]`` → "a tuple of float"."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected) if a is not type(None))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return f"a {origin.__name__} whose items are each {_describe(args[0])}" if args else f"a {origin.__name__}"
    names = {bool: "a bool (true / false)", int: "an int", float: "a number", str: "a string"}
    return names.get(expected, f"a {getattr(expected, '__name__', expected)}")
