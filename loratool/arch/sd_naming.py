"""Adapter module names in every naming, generated from the checkpoint key tables.

A module is known by one :class:`ModuleTarget`; its native names are generated
from it (never parsed back from ``_``-joined strings):

    kohya      ``lora_unet_down_blocks_0_attentions_0_proj_in`` (SD1/SD2 UNet: diffusers paths;
               SDXL UNet: LDM paths; text encoders: HF CLIP paths, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``)
    peft       ``unet.down_blocks.0.attentions.0.proj_in`` (keys ``.lora_A.weight`` / ``.lora_B.weight``)
    diffusers  same module path as peft (keys ``.lora.down.weight`` / ``.lora_linear_layer.down.weight``)

Module sets:

    all_modules       every 2-D Linear and 4-D Conv weight of the UNet and the text encoders
                      (VAE, norms, embeddings and SDXL's ``text_projection`` excluded)
    kohya_modules     kohya's default + ``conv_dim`` network (from the reference table)
    lycoris_modules   LyCORIS' ``full`` preset: kohya's set plus the modules named ``conv_in``,
                      ``conv_out``, ``time_embedding.linear_1`` / ``linear_2`` in the trained UNet
"""

from __future__ import annotations

from functools import cache

from . import ARCHES, ModuleTarget, checkpoint_layout, kohya_modules
from .sd_checkpoint import checkpoint_links

NAMINGS = ("kohya", "peft")

_UNET_LDM_PREFIX = "model.diffusion_model."
# Parameters that are 2-D but belong to embeddings, or that need a transpose to merge.
_NOT_ADAPTABLE = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "text_projection.weight")
# LyCORIS matches these module names in the trained model; sd-scripts' SDXL UNet uses LDM names, so none match there.
_LYCORIS_FULL_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def _kohya_prefix(arch: str, component: str) -> str:
    if component == "unet":
        return "lora_unet_"
    if arch == "sdxl":
        return "lora_te1_" if component == "text_encoder" else "lora_te2_"
    return "lora_te_"


def _kind(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "linear"
    return "conv1x1" if tuple(shape[2:]) == (1, 1) else "conv3x3"


@cache
def generated_modules(arch: str) -> dict[str, ModuleTarget]:
    """kohya name → target for every adaptable weight, generated from the checkpoint links.

    ``kind`` here is the layer kind of the diffusers weight; kohya's own table (see
    :func:`all_modules`) may differ for SD2's ``proj_in``/``proj_out`` (1x1 conv in kohya's training UNet).
    """
    ldm = checkpoint_layout(arch, "ldm")
    dif = checkpoint_layout(arch, "diffusers")
    out: dict[str, ModuleTarget] = {}
    for link in checkpoint_links(arch).links:
        component, key = link.diffusers_key.split("/", 1)
        if component == "vae" or not key.endswith(".weight") or key.endswith(_NOT_ADAPTABLE):
            continue
        shape = dif[link.diffusers_key].shape
        if len(shape) not in (2, 4):
            continue
        if component == "unet" and arch == "sdxl":
            path = link.ldm_key.removeprefix(_UNET_LDM_PREFIX)
        else:
            path = key
        name = _kohya_prefix(arch, component) + path.removesuffix(".weight").replace(".", "_")
        if name in out:
            raise AssertionError(f"{arch}: two weights get the module name {name}")
        out[name] = ModuleTarget(name, _kind(shape), link.ldm_key, link.rows, ldm[link.ldm_key].shape, link.diffusers_key)
    return out


@cache
def all_modules(arch: str) -> dict[str, ModuleTarget]:
    """kohya name → target for every adaptable module of ``arch``.

    The generated set, with kohya's own table entries (identical except for the trained layer
    ``kind``) taking precedence, so ``kohya_modules(arch)`` is a sub-dict.
    """
    out = dict(generated_modules(arch))
    for name, target in kohya_modules(arch).items():
        if name not in out:
            raise AssertionError(f"{arch}: kohya module {name} is not an adaptable weight of the layout")
        out[name] = target
    return out


@cache
def lycoris_modules(arch: str) -> dict[str, ModuleTarget]:
    """kohya name → target of LyCORIS' ``full`` preset (sd-scripts' ``lycoris.kohya`` network).

    SD1.5: 72 TE + 282 UNet modules (kohya's 278 + conv_in, conv_out, time_embedding.linear_1/2).
    SDXL: sd-scripts' UNet has LDM module names, so the named extras match nothing (derived from
    the preset's name list, not verified with a real SDXL LyCORIS file).
    """
    out = dict(kohya_modules(arch))
    if arch == "sdxl":
        return out
    for name, target in all_modules(arch).items():
        if target.component == "unet" and target.peft_module.removeprefix("unet.") in _LYCORIS_FULL_NAMES:
            out[name] = target
    return out


@cache
def module_index(arch: str) -> dict[str, tuple[str, ModuleTarget]]:
    """Every native module name of ``arch`` → (naming, target). Names are unique across namings."""
    out: dict[str, tuple[str, ModuleTarget]] = {}
    for target in all_modules(arch).values():
        for naming, name in (("kohya", target.name), ("peft", target.peft_module)):
            if name in out and out[name][1] != target:
                raise AssertionError(f"{arch}: module name {name} is ambiguous")
            out[name] = (naming, target)
    return out


def native_name(target: ModuleTarget, naming: str) -> str:
    """The module name of ``target`` in ``naming`` (``kohya`` or ``peft``/``diffusers``)."""
    if naming == "kohya":
        return target.name
    if naming in ("peft", "diffusers"):
        return target.peft_module
    raise ValueError(f"unknown naming {naming!r}")


__all__ = [
    "ARCHES",
    "NAMINGS",
    "module_index",
    "all_modules",
    "generated_modules",
    "kohya_modules",
    "lycoris_modules",
    "native_name",
]
