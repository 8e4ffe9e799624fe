"""FLUX.1 adapter module names, from the key tables.

Two kinds of target:

    fused   kohya / LyCORIS modules on BFL tensors (``lora_unet_double_blocks_0_img_attn_qkv`` changes the whole
            ``img_attn.qkv`` tensor, ``lora_unet_single_blocks_0_linear1`` the whole ``linear1``): one ΔW over
            all of its rows (``flux1-lora-kohya-to-bfl.tsv``)
    split   PEFT / diffusers modules on diffusers Linear layers (``transformer.transformer_blocks.0.attn.to_q``),
            each a row slice of a fused BFL tensor or a whole one (``flux1-diffusers-to-bfl.tsv``); their kohya
            spelling ``lora_transformer_transformer_blocks_0_attn_to_q`` (kohya-style names of diffusers modules,
            as some trainers save them) is the target's name

ComfyUI / ai-toolkit files name the fused modules by their BFL path (``diffusion_model.double_blocks.0.img_attn.qkv``
with ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``), LyCORIS sometimes as ``lycoris_double_blocks_0_img_attn_qkv``.

XLabs files (x-flux) name processors added to BFL layers (``double_blocks.0.processor.qkv_lora1``: 1 the image,
2 the text stream; ``single_blocks.0.processor.qkv_lora`` covers linear1's q, k, v rows, not its MLP rows), with
``down``/``up`` factors and no alpha (scale 1, as x-flux and diffusers apply them): :data:`XLABS_PROCESSORS`.

Text-encoder modules (kohya ``lora_te1_`` CLIP-L, ``lora_te3_`` T5-XXL; PEFT ``text_encoder.``) are shared by
both namings. ``norm_out.linear`` is BFL's ``final_layer.adaLN_modulation.1`` with its two halves (shift,
scale) swapped: its target keeps the diffusers orientation, and a merge into a BFL tensor applies the two
halves of its ΔW to the swapped rows (:func:`loratool.arch.swapped_halves`).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from . import ModuleTarget, _read, kohya_modules

_SPLIT_PREFIX = "lora_transformer_"
_T5_KOHYA, _T5_ALIAS = "lora_te3_", "lora_te2_"  # kohya's T5 prefix; the second text encoder's prefix elsewhere


@cache
def links() -> tuple[tuple[str, str, tuple[int, int] | None, str, tuple[int, ...], tuple[int, ...]], ...]:
    """Rows of ``flux1-diffusers-to-bfl.tsv``: (diffusers key, BFL key, rows, transform, diffusers shape, BFL shape)."""
    out = []
    for line in _read("flux1-diffusers-to-bfl.tsv").splitlines():
        if not line:
            continue
        dkey, bkey, rows, transform, dshape, bshape = line.split("\t")
        r = tuple(int(x) for x in rows.split(":")) if rows else None
        out.append((dkey, bkey, r, transform, tuple(int(x) for x in dshape.split(",")),
                    tuple(int(x) for x in bshape.split(","))))
    return tuple(out)


@cache
def split_modules() -> dict[str, ModuleTarget]:
    """Every diffusers transformer Linear (PEFT / diffusers LoRA targets) → its BFL tensor and rows."""
    out: dict[str, ModuleTarget] = {}
    for dkey, bkey, rows, _transform, dshape, bshape in links():
        if not dkey.endswith(".weight") or len(dshape) != 2:
            continue
        path = dkey.split("/", 1)[1].removesuffix(".weight")
        name = _SPLIT_PREFIX + path.replace(".", "_")
        out[name] = ModuleTarget(name, "linear", bkey, rows, bshape, dkey)
    return out


SWAPPED_HALVES = frozenset(d for d, _, _, t, _, _ in links() if t == "swap_halves")

# XLabs (x-flux) LoRA processors: processor attribute → the BFL layer whose output it adds to, and the diffusers
# parts of that layer it covers (None: all of it). The single blocks' ``qkv_lora`` adds to linear1's q, k, v rows
# only, not its MLP-in rows. 1 is the image stream, 2 the text stream.
XLABS_PROCESSORS: dict[str, dict[str, tuple[str, tuple[str, ...] | None]]] = {
    "double_blocks": {
        "qkv_lora1": ("img_attn.qkv", None), "proj_lora1": ("img_attn.proj", None),
        "qkv_lora2": ("txt_attn.qkv", None), "proj_lora2": ("txt_attn.proj", None),
    },
    "single_blocks": {
        "qkv_lora": ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v")), "proj_lora": ("linear2", None),
    },
}


@cache
def xlabs_modules() -> dict[str, ModuleTarget]:
    """XLabs module name (``double_blocks.0.processor.qkv_lora1``) → target, from the kohya table's targets
    (:data:`XLABS_PROCESSORS`): the whole fused tensor, or the row slice of the parts the processor covers."""
    by_address = {t.address: t for t in kohya_modules("flux1").values() if t.component == "transformer"}
    parts_of: dict[str, list[ModuleTarget]] = {}
    for part in split_modules().values():
        parts_of.setdefault(part.address, []).append(part)
    out: dict[str, ModuleTarget] = {}
    for blocks, processors in XLABS_PROCESSORS.items():
        n = 0
        while f"{blocks}.{n}.{next(iter(processors.values()))[0]}.weight" in by_address:
            for proc, (layer, parts) in processors.items():
                whole = by_address[f"{blocks}.{n}.{layer}.weight"]
                name = f"{blocks}.{n}.processor.{proc}"
                if parts is None:
                    out[name] = whole
                    continue
                prefix = whole.diffusers_key.split("/", 1)[1].split(".")[:2]  # single_transformer_blocks.N
                wanted = {f"transformer/{'.'.join(prefix)}.{p}.weight" for p in parts}
                chosen = sorted((t for t in parts_of[whole.address] if t.diffusers_key in wanted),
                                key=lambda t: t.rows)
                if len(chosen) != len(parts) or any(a.rows[1] != b.rows[0] for a, b in zip(chosen, chosen[1:])):
                    raise AssertionError(f"flux1: XLabs {name} covers no contiguous rows of {whole.address}")
                rows = (chosen[0].rows[0], chosen[-1].rows[1])
                out[name] = ModuleTarget(name, "linear", whole.address, rows, whole.shape,
                                         "+".join(t.diffusers_key for t in chosen))
            n += 1
    return out


@cache
def extra_kohya_modules() -> dict[str, ModuleTarget]:
    """kohya names of the BFL Linear weights outside kohya's default network (``img_in``, ``txt_in``,
    ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer.linear``): ``lora_unet_`` + the BFL path, the names
    diffusers' kohya FLUX converter reads and ComfyUI's key map builds for every BFL weight. They target the whole
    BFL tensor. ``lora_unet_final_layer_adaLN_modulation_1`` is not here: it holds ``norm_out`` in BFL's (swapped)
    row order, see :data:`BFL_ORDER_NAMES`."""
    taken = {t.address for t in kohya_modules("flux1").values()}
    out = {}
    for target in split_modules().values():
        if target.rows is None and target.address not in taken and target.diffusers_key not in SWAPPED_HALVES:
            name = "lora_unet_" + target.address.removesuffix(".weight").replace(".", "_")
            out[name] = replace(target, name=name)
    return out


# native names of the norm_out module in BFL's row order (shift and scale halves swapped against diffusers'
# norm_out.linear): read as the diffusers-ordered target with the halves of ΔW swapped back (:func:`bfl_order`)
_NORM_OUT = "final_layer.adaLN_modulation.1"
BFL_ORDER_NAMES = frozenset({"lora_unet_" + _NORM_OUT.replace(".", "_"), "diffusion_model." + _NORM_OUT, _NORM_OUT,
                             "lycoris_" + _NORM_OUT.replace(".", "_")})
BFL_ORDER_KOHYA_NAME = "lora_unet_" + _NORM_OUT.replace(".", "_")


@cache
def module_index(arch: str = "flux1") -> dict[str, tuple[str, ModuleTarget]]:
    """Every native module name → (naming, target): kohya names of the fused modules and the text encoders,
    kohya-style and PEFT names of the split ones."""
    out: dict[str, tuple[str, ModuleTarget]] = {}

    def add(name: str, naming: str, target: ModuleTarget) -> None:
        if name in out and out[name][1] != target:
            raise AssertionError(f"flux1: module name {name} is ambiguous")
        out[name] = (naming, target)

    for target in kohya_modules("flux1").values():
        add(target.name, "kohya", target)
        if target.name.startswith(_T5_KOHYA):  # LyCORIS, OneTrainer and ComfyUI also call FLUX's T5 lora_te2_
            add(_T5_ALIAS + target.name[len(_T5_KOHYA):], "kohya", target)
        if target.component != "transformer":
            add(target.peft_module, "peft", target)
        else:  # ComfyUI / ai-toolkit spell the fused modules by their BFL path; LyCORIS may prefix lycoris_
            path = target.address.removesuffix(".weight")
            add("diffusion_model." + path, "peft", target)
            add(path, "peft", target)  # BFL control LoRAs: bare BFL paths with lora_A / lora_B
            add("lycoris_" + path.replace(".", "_"), "kohya", target)
    for target in split_modules().values():
        add(target.name, "kohya", target)
        add(target.peft_module, "peft", target)
    for name, target in xlabs_modules().items():
        add(name, "xlabs", target)
        add("diffusion_model." + name, "xlabs", target)
    for name, target in extra_kohya_modules().items():
        path = target.address.removesuffix(".weight")
        add(name, "kohya", target)
        add("diffusion_model." + path, "peft", target)
        add(path, "peft", target)
        add("lycoris_" + path.replace(".", "_"), "kohya", target)
    norm_out = next(t for t in split_modules().values() if t.diffusers_key in SWAPPED_HALVES)
    for name in BFL_ORDER_NAMES:
        add(name, "kohya" if name.startswith(("lora_", "lycoris_")) else "peft", norm_out)
    return out


@cache
def checkpoint_links():
    """The BFL ↔ diffusers transformer bijection, straight from ``flux1-diffusers-to-bfl.tsv`` (q/k/v and the
    single blocks' MLP input as row slices of the fused BFL tensors; ``norm_out`` with its halves swapped)."""
    from .sd_checkpoint import CheckpointLinks, KeyLink

    order = {k: i for i, k in enumerate(sorted({row[1] for row in links()}))}
    rows = sorted(links(), key=lambda r: (order[r[1]], r[2] or (0, 0)))
    return CheckpointLinks(
        "flux1", tuple(KeyLink(b, d, r, t or None) for d, b, r, t, _, _ in rows), {}, {}
    )


def flux_transformer_config(config, guidance: bool) -> dict:
    """diffusers ``FluxTransformer2DModel`` config of a transformer in shape config ``config``."""
    heads = config["hidden_size"] // config["head_dim"]
    d = config["head_dim"]
    # RoPE axes: (t, h, w) dims summing to the head size, as released (16, 56, 56) for 128
    axes = (16, 56, 56) if d == 128 else (d // 4, d * 3 // 8, d - d // 4 - d * 3 // 8)
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": d,
        "axes_dims_rope": list(axes),
        "guidance_embeds": guidance,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "joint_attention_dim": config["context_dim"],
        "num_attention_heads": heads,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": config["pooled_dim"],
    }
