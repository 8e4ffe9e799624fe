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

Text-encoder modules (kohya ``lora_te1_`` CLIP-L, ``lora_te3_`` T5-XXL; PEFT ``text_encoder.``) are shared by
both namings. ``norm_out.linear`` is BFL's ``final_layer.adaLN_modulation.1`` with its two halves (shift,
scale) swapped: its target keeps the diffusers orientation, and a merge into a BFL tensor applies the two
halves of its ΔW to the swapped rows (:func:`loratool.arch.swapped_halves`).
"""

from __future__ import annotations

from functools import cache

from . import ModuleTarget, _read, kohya_modules

_SPLIT_PREFIX = "lora_transformer_"


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
        if target.component != "transformer":
            add(target.peft_module, "peft", target)
        else:  # ComfyUI / ai-toolkit spell the fused modules by their BFL path; LyCORIS may prefix lycoris_
            path = target.address.removesuffix(".weight")
            add("diffusion_model." + path, "peft", target)
            add("lycoris_" + path.replace(".", "_"), "kohya", target)
    for target in split_modules().values():
        add(target.name, "kohya", target)
        add(target.peft_module, "peft", target)
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
