"""Stable Diffusion 1.x, 2.x and XL: components and the shape config.

The key tables are in ``data/sd15-*``, ``data/sd21-*``, ``data/sdxl-*``; the single-file ↔
diffusers naming rules in :mod:`.sd_checkpoint`; adapter module names in :mod:`.sd_naming`.

Shape config (the numbers diffusers' ``config.json`` files hold, or follow from):

    unet_channels    ``block_out_channels[0]``; the UNet's sizes are 1, 2, 3, 4, 6, 8, 16, 32 × it
                     (level widths, skip concatenations, time embedding = 4×, GEGLU = 8× the level)
    context_dim      ``cross_attention_dim`` (the text encoders' hidden size, both together in SDXL)
    adm_channels     SDXL: input of ``label_emb`` / ``add_embedding`` (pooled text + 6 size embeddings)
    latent_channels  the VAE's latent channels = the UNet's ``in_channels`` / ``out_channels``
    text_width(_2)   CLIP ``hidden_size`` (MLP 4×; OpenCLIP fuses q, k, v into 3× rows, sliced at 1× and 2×)
    vocab_size, max_positions   CLIP token and position embeddings
    vae_channels     ``block_out_channels[0]`` of the VAE (levels 1, 2, 4 ×)
"""

from __future__ import annotations

from functools import cache

from .dims import Dim, ShapeRules

_UNET_LEVELS = (1, 2, 3, 4, 6, 8, 16, 32)
_TEXT = ("text_encoder", "text_encoder_2")

_DIMS = {
    "unet_channels": Dim("unet_channels", "UNet block_out_channels[0]", {"unet": _UNET_LEVELS}),
    "context_dim": Dim("context_dim", "UNet cross_attention_dim", {"unet": (1,)}),
    "adm_channels": Dim("adm_channels", "SDXL UNet label_emb input (projection_class_embeddings_input_dim)", {"unet": (1,)}),
    "latent_channels": Dim("latent_channels", "VAE latent_channels = UNet in/out_channels", {"unet": (1,), "vae": (1, 2)}),
    "text_width": Dim("text_width", "text encoder hidden_size", {"text_encoder": (1, 2, 3, 4)}),
    "text_width_2": Dim("text_width_2", "SDXL second text encoder hidden_size", {"text_encoder_2": (1, 2, 3, 4)}),
    "vocab_size": Dim("vocab_size", "CLIP vocab_size", {c: (1,) for c in _TEXT}),
    "max_positions": Dim("max_positions", "CLIP max_position_embeddings", {c: (1,) for c in _TEXT}),
    "vae_channels": Dim("vae_channels", "VAE block_out_channels[0]", {"vae": (1, 2, 4)}),
}

_CLIP = {"vocab_size": 49408, "max_positions": 77, "vae_channels": 128, "latent_channels": 4, "unet_channels": 320}
STANDARD = {
    "sd1": {**_CLIP, "context_dim": 768, "text_width": 768},
    "sd2": {**_CLIP, "context_dim": 1024, "text_width": 1024},
    "sdxl": {**_CLIP, "context_dim": 2048, "adm_channels": 2816, "text_width": 768, "text_width_2": 1280},
}


@cache
def shape_rules(arch: str) -> ShapeRules:
    """The shape config rules of ``sd1`` / ``sd2`` / ``sdxl`` (standard values: the released models)."""
    std = STANDARD[arch]
    return ShapeRules(arch, tuple(d for name, d in _DIMS.items() if name in std), std)


# Single-file keys under this prefix are the training run's EMA shadow copy of the model weights.
EMA_PREFIX = "model_ema."

# Single-file key prefix → component; diffusers keys are ``component/key``.
COMPONENT_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("first_stage_model.", "vae"),
)
COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2", "vae": "VAE"}


def component_of_key(key: str) -> tuple[str, str]:
    """``(component, key without its component prefix)`` of a checkpoint key (``other`` when unknown)."""
    if "/" in key:
        comp, rest = key.split("/", 1)
        return (comp, rest) if comp in COMPONENT_LABELS else ("other", key)
    for prefix, comp in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return comp, key[len(prefix):]
    return "other", key
