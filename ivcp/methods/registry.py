"""The one registry of pruning methods."""

from __future__ import annotations

from typing import Any

from .base import PruningMethod

_METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register a :class:`PruningMethod` subclass under ``cls.name``. An object built
    directly (``ivcp.IVCPrune(keep_ratio=0.5)``) remembers the fields its caller passed, as
    :func:`make_method` does for a name: configs fill the others, so it acts like the name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__name__})")
    _METHODS[cls.name] = cls
    _record_passed_fields(cls)
    return cls


def _record_passed_fields(cls: type[PruningMethod]) -> None:
    import dataclasses
    import functools

    init = cls.__init__
    if getattr(init, "_records_passed_fields", False) or not dataclasses.is_dataclass(cls):
        return
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._explicit = frozenset(names[: len(args)]) | frozenset(kwargs)

    __init__._records_passed_fields = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def available_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


def method_class(name: str) -> type[PruningMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def make_method(method: str | PruningMethod, **params: Any) -> PruningMethod:
    """A method object from a registered name (with parameters) or an existing object. The fields
    passed here count as set by the caller: configs never override them (see ``with_defaults``)."""
    import dataclasses

    if isinstance(method, PruningMethod):
        if not params:
            return method
        out = dataclasses.replace(method, **params)
        explicit = getattr(method, "_explicit", None)
        if explicit is not None:
            out._explicit = explicit | frozenset(params)
        return out
    if not isinstance(method, str):
        raise ValueError(f"method must be a registered name or a PruningMethod, got {type(method).__name__}")
    cls = method_class(method)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
    out = cls(**params)
    out._explicit = frozenset(params)
    return out
