"""FLUX.1 (dev, schnell, Fill, Depth/Canny): components, shape config, names.

Key tables (``data/flux1-*``, produced by running sd-scripts and diffusers themselves):

    flux1-dev-bfl.tsv          the BFL transformer file, bare keys (``double_blocks.0.img_attn.qkv.weight``)
    flux1-schnell-bfl.tsv      the same without the four ``guidance_in.*`` keys
    flux1-dev-diffusers.tsv    diffusers ``transformer/`` keys
    flux1-diffusers-to-bfl.tsv every diffusers key → its BFL key, row slice of a fused tensor, and transform
                               (``swap_halves``: ``norm_out`` stores shift/scale the other way round)
    flux1-lora-kohya-to-bfl.tsv kohya module → the tensor it changes (fused modules change the whole tensor)

Naming ``ldm`` means the architecture's own single-file names — BFL's for FLUX — and ``diffusers`` the
folder's ``component/key`` names, as for SD.

Shape config (diffusers ``FluxTransformer2DModel`` config in brackets):

    hidden_size    3072 = heads × head_dim [num_attention_heads × attention_head_dim]; sizes 1…7 × it
                   (fused q/k/v 3×, MLP 4×, single-block ``linear1`` 7× = q, k, v + MLP, ``linear2`` input 5×,
                   modulations 6× / 3×, ``final_layer`` adaLN 2×)
    head_dim       128, the QK-norm scales [attention_head_dim]
    context_dim    4096, T5's width [joint_attention_dim]
    pooled_dim     768, CLIP-L's pooled width [pooled_projection_dim]
    in_channels    64 = 16 latent channels × 2×2 patch; 384 for Fill, 128 for Depth/Canny [in_channels]
    out_channels   64 [out_channels]
    text_width     CLIP-L hidden size (768; MLP 4×); t5_width / t5_ff: T5-XXL d_model 4096 / d_ff 10240
"""

from __future__ import annotations

from functools import cache

from .dims import Dim, ShapeRules

ARCH = "flux1"
SINGLE_FILE_PREFIX = "model.diffusion_model."  # ComfyUI all-in-one files put the BFL keys under it

_DIMS = (
    Dim("hidden_size", "transformer width", {"transformer": (1, 2, 3, 4, 5, 6, 7)}),
    Dim("head_dim", "attention_head_dim", {"transformer": (1,)}),
    Dim("context_dim", "joint_attention_dim (T5 width)", {"transformer": (1,)}),
    Dim("pooled_dim", "pooled_projection_dim (CLIP-L pooled width)", {"transformer": (1,)}),
    Dim("out_channels", "out_channels (packed latent)", {"transformer": (1,)}),
    Dim("in_channels", "in_channels (packed latent + conditioning; Fill 384, Depth 128)", {}),
    Dim("text_width", "CLIP-L hidden_size", {"text_encoder": (1, 4)}),
    Dim("t5_width", "T5 d_model", {"text_encoder_2": (1,)}),
    Dim("t5_ff", "T5 d_ff", {"text_encoder_2": (1,)}),
)
STANDARD = {
    "hidden_size": 3072, "head_dim": 128, "context_dim": 4096, "pooled_dim": 768, "out_channels": 64,
    "in_channels": 64, "text_width": 768, "t5_width": 4096, "t5_ff": 10240,
}  # fmt: skip
# img_in's input width is in_channels, not the (equal, in dev) output width
_IN_CHANNELS = {1: ("in_channels", 1)}
_BY_KEY = {"img_in.weight": _IN_CHANNELS, "transformer/x_embedder.weight": _IN_CHANNELS}

# variant → img_in input width
VARIANT_WIDTHS = {64: "dev", 384: "fill", 128: "depth"}


@cache
def shape_rules() -> ShapeRules:
    return ShapeRules(ARCH, _DIMS, STANDARD, _BY_KEY)


COMPONENT_PREFIXES = (
    ("text_encoders.clip_l.", "text_encoder"),
    ("text_encoders.t5xxl.", "text_encoder_2"),
    ("vae.", "vae"),
)
# ComfyUI's separate files of an all-in-one FLUX checkpoint (models/diffusion_models, models/text_encoders,
# models/vae): component → (file name, key prefix in the all-in-one file, keys under the component's own prefix
# that are not under that key prefix). A component file holds the keys with the key prefix removed.
COMPONENT_FILES: tuple[tuple[str, str, str, frozenset[str]], ...] = (
    ("transformer", "transformer.safetensors", SINGLE_FILE_PREFIX, frozenset()),
    ("text_encoder", "clip_l.safetensors", "text_encoders.clip_l.transformer.", frozenset({"logit_scale"})),
    ("text_encoder_2", "t5xxl.safetensors", "text_encoders.t5xxl.transformer.", frozenset()),
    ("vae", "ae.safetensors", "vae.", frozenset()),
)

COMPONENT_LABELS = {"transformer": "transformer", "text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL", "vae": "VAE"}
_TOP = ("img_in.", "time_in.", "vector_in.", "guidance_in.", "txt_in.", "double_blocks.", "single_blocks.", "final_layer.")


def component_of_key(key: str) -> tuple[str, str]:
    """``(component, key without its component prefix)`` of a FLUX key (BFL, ComfyUI or diffusers)."""
    if "/" in key:
        comp, rest = key.split("/", 1)
        return (comp, rest) if comp in COMPONENT_LABELS else ("other", key)
    bare = key.removeprefix(SINGLE_FILE_PREFIX)
    if bare.startswith(_TOP):
        return "transformer", bare
    for prefix, comp in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return comp, key[len(prefix):]
    return "other", key


def is_scaled_fp8_key(key: str) -> bool:
    """ComfyUI scaled-fp8 bookkeeping: the ``scaled_fp8`` marker and the per-weight ``scale_weight`` /
    ``scale_input`` scalars next to fp8 weights (``W = stored · scale_weight``)."""
    bare = key.removeprefix(SINGLE_FILE_PREFIX)
    return bare == "scaled_fp8" or bare.endswith((".scale_weight", ".scale_input"))


def variant(keys, img_in_width: int | None) -> str:
    """``dev``, ``schnell``, ``fill``, ``depth`` or ``chroma`` from a transformer's keys and ``img_in`` width."""
    keys = set(keys)
    bare = {k.removeprefix(SINGLE_FILE_PREFIX) for k in keys}
    if any(k.startswith("distilled_guidance_layer.") for k in bare):
        return "chroma"
    width = VARIANT_WIDTHS.get(img_in_width or 64, "dev")
    if width != "dev":
        return width
    guided = "guidance_in.in_layer.weight" in bare or "transformer/time_text_embed.guidance_embedder.linear_1.weight" in keys
    return "dev" if guided else "schnell"
