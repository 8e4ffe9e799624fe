"""Model sizes read from a checkpoint's shapes (no tensor data).

Every size of the SD1 network (UNet, CLIP text encoder, VAE) follows from the shapes of a few
keys, so the same code builds the real SD1.5 network and the bundled tiny one. The number of
attention heads is not stored in a checkpoint: SD1 uses 8 UNet heads and 12 CLIP heads; a smaller
model uses the largest divisor of those counts that divides its width (``gcd``), so the head
dimension is always an integer. GroupNorm groups follow the same rule with 32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import gcd

from ...errors import DetectionError

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    context_dim: int
    num_heads: int
    groups: int

    @property
    def time_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    max_positions: int


@dataclass(frozen=True)
class VAEConfig:
    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    groups: int


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig
    text: TextConfig
    vae: VAEConfig

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell: 2^(VAE levels − 1) (8 for SD1)."""
        return 2 ** (len(self.vae.channel_mult) - 1)


def _shape(specs: Mapping[str, object], key: str) -> tuple[int, ...]:
    spec = specs.get(key)
    if spec is None:
        raise DetectionError(f"checkpoint has no {key}", hint="loratool train/sample need a full SD1 single-file checkpoint")
    return tuple(spec.shape)


def infer_config(specs: Mapping[str, object]) -> SDConfig:
    """Read :class:`SDConfig` from ``{key: TensorSpec}`` of a single-file SD1 checkpoint.

    Raises:
        DetectionError: a key the sizes are read from is missing.
    """
    keys = set(specs)
    conv_in = _shape(specs, UNET + "input_blocks.0.0.weight")
    mc = conv_in[0]
    mults: list[int] = []
    attn: list[bool] = []
    res_per_level: list[int] = []
    i = 1
    while f"{UNET}input_blocks.{i}.0.in_layers.2.weight" in keys or f"{UNET}input_blocks.{i}.0.op.weight" in keys:
        if f"{UNET}input_blocks.{i}.0.op.weight" in keys:
            i += 1
            continue
        out = _shape(specs, f"{UNET}input_blocks.{i}.0.in_layers.2.weight")[0]
        has_attn = f"{UNET}input_blocks.{i}.1.proj_in.weight" in keys
        if not mults or f"{UNET}input_blocks.{i - 1}.0.op.weight" in keys:
            mults.append(out // mc)
            attn.append(has_attn)
            res_per_level.append(0)
        res_per_level[-1] += 1
        i += 1
    if not mults:
        raise DetectionError("checkpoint has no UNet input blocks", hint="is this an SD1 checkpoint?")
    context = _shape(specs, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")[1] if attn[0] else \
        _shape(specs, UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    unet = UNetConfig(conv_in[1], mc, tuple(mults), res_per_level[0], tuple(attn), context, gcd(8, mc), gcd(32, mc))

    tok = _shape(specs, TEXT + "embeddings.token_embedding.weight")
    pos = _shape(specs, TEXT + "embeddings.position_embedding.weight")
    layers = 0
    while f"{TEXT}encoder.layers.{layers}.mlp.fc1.weight" in keys:
        layers += 1
    mlp = _shape(specs, TEXT + "encoder.layers.0.mlp.fc1.weight")[0]
    text = TextConfig(tok[0], tok[1], layers, gcd(12, tok[1]), mlp, pos[0])

    ch = _shape(specs, VAE + "encoder.conv_in.weight")[0]
    vmult: list[int] = []
    while f"{VAE}encoder.down.{len(vmult)}.block.0.conv1.weight" in keys:
        vmult.append(_shape(specs, f"{VAE}encoder.down.{len(vmult)}.block.0.conv1.weight")[0] // ch)
    nres = 0
    while f"{VAE}encoder.down.0.block.{nres}.conv1.weight" in keys:
        nres += 1
    z = _shape(specs, VAE + "post_quant_conv.weight")[0]
    vae = VAEConfig(ch, tuple(vmult), nres, z, gcd(32, ch))
    return SDConfig(unet, text, vae)
