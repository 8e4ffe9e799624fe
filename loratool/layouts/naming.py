"""Adapter module names in every naming, generated from the module tables.

A module is known by one :class:`ModuleTarget`; its native names are generated
from it (never parsed back from ``_``-joined strings):

    kohya      ``lora_unet_down_blocks_0_attentions_0_proj_in`` (SD1/SD2: diffusers paths; SDXL: LDM paths)
    peft       ``unet.down_blocks.0.attentions.0.proj_in`` (keys ``.lora_A.weight`` / ``.lora_B.weight``)
    diffusers  same module path as peft (keys ``.lora.down.weight`` / ``.lora_linear_layer.down.weight``)
"""

from __future__ import annotations

from functools import cache

from . import ARCHES, ModuleTarget, kohya_modules

NAMINGS = ("kohya", "peft")


@cache
def module_index(arch: str) -> dict[str, tuple[str, ModuleTarget]]:
    """Every native module name of ``arch`` → (naming, target). Names are unique across namings."""
    out: dict[str, tuple[str, ModuleTarget]] = {}
    for target in all_modules(arch).values():
        out[target.name] = ("kohya", target)
        out[target.peft_module] = ("peft", target)
    return out


@cache
def all_modules(arch: str) -> dict[str, ModuleTarget]:
    """kohya name → target for every adaptable module known for ``arch``.

    Starts from the kohya default+conv network and adds the extra modules that
    LyCORIS' ``full`` preset targets.
    """
    return dict(kohya_modules(arch))


def native_name(target: ModuleTarget, naming: str) -> str:
    """The module name of ``target`` in ``naming`` (``kohya`` or ``peft``/``diffusers``)."""
    if naming == "kohya":
        return target.name
    if naming in ("peft", "diffusers"):
        return target.peft_module
    raise ValueError(f"unknown naming {naming!r}")


def by_address(arch: str) -> dict[tuple[str, tuple[int, int] | None], ModuleTarget]:
    """(address, rows) → target."""
    return {(t.address, t.rows): t for t in all_modules(arch).values()}


__all__ = ["ARCHES", "NAMINGS", "module_index", "all_modules", "native_name", "by_address"]
