"""Pruning methods: one file each, registered by name. Importing this package registers them all."""

from .base import PruningMethod
from .registry import available_methods, make_method, method_class, register_method
from . import adaptprune, drop_ivc, fastv, ivc_prune, ivc_union, pdrop, random, vscan, window_fastv  # noqa: F401

__all__ = ["PruningMethod", "available_methods", "make_method", "method_class", "register_method"]
