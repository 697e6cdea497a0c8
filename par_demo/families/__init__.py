"""Model families: one file each, found from the checkpoint's `config.model_type`.

Adding a family = one file with a `Family` subclass (see `base.py` for what it must say) + its tests, and one line
in `FAMILIES` below. Nothing else in par-demo branches on the family.
"""

from __future__ import annotations

from par_demo.errors import UserError
from par_demo.families.base import Family, Layout, Query
from par_demo.families.internvl import InternVL
from par_demo.families.llava import Llava
from par_demo.families.qwen2_5_vl import Qwen2_5_VL
from par_demo.families.smolvlm import SmolVLM

FAMILIES: tuple[Family, ...] = (Llava(), Qwen2_5_VL(), SmolVLM("idefics3"), SmolVLM("smolvlm"),
                                InternVL())


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UserError(f"model type '{model_type}' is not supported; par-demo runs: "
                    f"{', '.join(supported_model_types())}")


def family_of(model) -> Family:
    return family_for_model_type(model.config.model_type)


def preset_families() -> dict[str, Family]:
    """`random:<name>` preset -> the family that builds it."""
    return {name: family for family in FAMILIES for name in family.preset_names}


__all__ = ["FAMILIES", "Family", "Layout", "Query", "family_for_model_type", "family_of", "preset_families",
           "supported_model_types"]
