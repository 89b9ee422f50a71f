"""Pruning methods: one file each, registered by name. Importing this package registers them all."""

from .base import PruningMethod
from .registry import available_methods, make_method, method_class, register_method
from . import adaptprune, drop_ivc, fastv, ivc_prune, ivc_union, pdrop, random, vscan, window_fastv  # noqa: F401
from .adaptprune import AdaptPrune
from .drop_ivc import DropIVC
from .fastv import FastV
from .ivc_prune import IVCPrune
from .ivc_union import IVCUnion
from .pdrop import PDrop
from .random import RandomPrune
from .vscan import VScan
from .window_fastv import WindowFastV

__all__ = ["AdaptPrune", "DropIVC", "FastV", "IVCPrune", "IVCUnion", "PDrop", "PruningMethod", "RandomPrune", "VScan",
           "WindowFastV", "available_methods", "make_method", "method_class", "register_method"]
