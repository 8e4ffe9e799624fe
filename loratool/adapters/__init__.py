"""Adapters (LoRA, LoCon, LoHa, LoKr, full diffs, DoRA): families, math and file I/O.

    families.py  the family table (roles, required roles, label), :class:`AdapterModule`, rank and scale
    math.py      ΔW of every family, the merge rule (DoRA included), closed-form norms, LyCORIS → LoRA factors
    io.py        the only code that reads or writes adapter key names: index, detect, load, save
"""

from .families import FAMILIES, AdapterModule, Family, FamilyName, factor_problem, family_of, rank_of, scale_of
from .io import (
    AdapterIndex,
    LoadedAdapter,
    best_arch,
    fit_count,
    index_adapter,
    load_adapter,
    shapes_fit,
    sized_index,
    split_key,
)
from .math import (
    DEFAULT_REL_TOL,
    apply_to_weight,
    delta,
    delta_norm_sq,
    loha_delta,
    lokr_delta,
    lora_delta,
    module_shape,
    to_lora_factors,
)

__all__ = [
    "DEFAULT_REL_TOL", "FAMILIES", "AdapterIndex", "AdapterModule", "Family", "FamilyName", "LoadedAdapter",
    "apply_to_weight", "best_arch", "delta", "delta_norm_sq", "factor_problem", "family_of",
    "fit_count", "index_adapter", "load_adapter", "loha_delta", "lokr_delta", "lora_delta", "module_shape",
    "rank_of", "scale_of", "shapes_fit", "sized_index", "split_key", "to_lora_factors",
]
