"""Pruning methods: one file each, registered by name. Importing this package registers them all."""

from .base import PruningMethod
from .registry import available_methods, make_method, method_class, register_method
from . import fastv, ivc_prune, random  # noqa: F401  (registration)

__all__ = ["PruningMethod", "available_methods", "make_method", "method_class", "register_method"]
