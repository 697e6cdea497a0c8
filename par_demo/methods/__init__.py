"""Pruning methods: each turns (query, budget) into a `PruningPlan`, behind one interface.

A budget is a fraction of the full model's prefill FLOPs (vision tower + projector + LM + router). Every method
searches its own settings, largest first, and takes the first whose FLOPs fit, so methods are always compared
at equal FLOPs. Explicit `tokens` / `layers` override the search (PAR-style fixed versions such as T=176/L=28).
"""

from __future__ import annotations

from par_demo.errors import UserError
from par_demo.methods.base import Method, Setting
from par_demo.methods.cdpruner import CDPruner, CDPrunerAbsorb
from par_demo.methods.divprune import DivPrune
from par_demo.methods.downsample import Downsample
from par_demo.methods.fastv import FastV
from par_demo.methods.full import Full
from par_demo.methods.layerdrop import LayerDrop
from par_demo.methods.par import Par
from par_demo.methods.par_ablations import ParDrop, ParLayers, ParPrior, ParTokens
from par_demo.methods.random_tokens import RandomTokens
from par_demo.methods.visionzip import VisionZip

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (Full, Par, FastV, RandomTokens, LayerDrop, VisionZip, DivPrune, CDPruner, Downsample,
                        CDPrunerAbsorb, ParTokens, ParLayers, ParPrior, ParDrop)
}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def method_class(name: str) -> type[Method]:
    key = str(name).strip().lower()
    if key not in REGISTRY:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return REGISTRY[key]


__all__ = ["METHODS", "REGISTRY", "Method", "Setting", "method_class"]
