"""The whole SD1 network (UNet + CLIP text encoder + VAE) under its single-file checkpoint names.

``StableDiffusion().state_dict()`` has exactly the weight keys of an SD1 LDM checkpoint, plus
``position_ids``; :func:`schedule_tensors` gives the DDPM buffers a checkpoint also stores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ...arch import layout_in, standard_config
from ...errors import FormatError
from ...io.source import TensorSpec, open_file
from .clip import TextEncoder
from .config import SDConfig, infer_config
from .unet import UNet
from .vae import AutoencoderKL

# The tiny base's shape config: SD1's layout at 1/32 of its widths (UNet 10 channels, CLIP width 24 with
# SD1's 77 positions and a 1544-token vocabulary, VAE 4 channels); diffusers builds the same model from it.
TINY_CONFIG = standard_config("sd1").replace(
    unet_channels=10, context_dim=24, text_width=24, vocab_size=1544, vae_channels=4
)
BETA_START, BETA_END, TIMESTEPS = 0.00085, 0.012, 1000


class _Wrapper(nn.Module):
    def __init__(self, unet: UNet):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """SD1 with LDM names: ``model.diffusion_model`` (UNet), ``cond_stage_model`` (CLIP), ``first_stage_model`` (VAE)."""

    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Wrapper(UNet(cfg.unet))
        self.cond_stage_model = TextEncoder(cfg.text)
        self.first_stage_model = AutoencoderKL(cfg.vae)

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model


def betas() -> torch.Tensor:
    """SD1's DDPM schedule: ``β_t = (√β_start + t/(T−1)·(√β_end − √β_start))²``, β 0.00085 → 0.012, T = 1000."""
    return torch.linspace(BETA_START**0.5, BETA_END**0.5, TIMESTEPS, dtype=torch.float64) ** 2


def alphas_cumprod() -> torch.Tensor:
    """``ᾱ_t = Π_{s≤t} (1 − β_s)`` (float32)."""
    return torch.cumprod(1.0 - betas(), dim=0).float()


def schedule_tensors() -> dict[str, torch.Tensor]:
    """The DDPM buffers an LDM checkpoint stores (``betas``, ``alphas_cumprod``, posterior coefficients…)."""
    b = betas()
    ac = torch.cumprod(1.0 - b, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=b.dtype), ac[:-1]])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": b,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac),
    }
    extra = {k: v.float() for k, v in out.items()}
    extra["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    extra["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return extra


_INIT_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)


@contextmanager
def _skip_init() -> Iterator[None]:
    """Layers skip ``reset_parameters`` (their values are about to be overwritten): building SD1.5 on
    the ``meta`` device drops from ~4 s to ~0.1 s. Not thread-safe (it patches the layer classes)."""
    saved = {cls: cls.__dict__.get("reset_parameters") for cls in _INIT_LAYERS}
    for cls in _INIT_LAYERS:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            if fn is None:
                del cls.reset_parameters  # inherited (Conv2d from _ConvNd)
            else:
                cls.reset_parameters = fn


def build_model(cfg: SDConfig, device: str | torch.device = "cpu", init: bool = True) -> StableDiffusion:
    """The network for ``cfg``; ``init=False`` leaves parameters uninitialised (on ``meta`` nothing is allocated,
    so SD1.5 sizes cost no memory)."""
    with torch.device(device):
        if init:
            return StableDiffusion(cfg)
        with _skip_init():
            return StableDiffusion(cfg)


def tiny_specs() -> dict[str, TensorSpec]:
    """The SD1 LDM key table in :data:`TINY_CONFIG` (the tiny base's shapes)."""
    return layout_in("sd1", "ldm", TINY_CONFIG)


def make_tiny(seed: int = 0) -> StableDiffusion:
    """A seeded SD1 network of :data:`TINY_CONFIG` (PyTorch default init), for the demo base."""
    torch.manual_seed(seed)
    return build_model(infer_config(tiny_specs()))


def checkpoint_tensors(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Every key of an SD1 LDM checkpoint: the model's parameters and buffers plus the schedule."""
    out = {k: v.detach() for k, v in model.state_dict().items()}
    out.update(schedule_tensors())
    return out


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion:
    """Build the network from a single-file SD1 checkpoint; tensors are read one at a time.

    Float weights become ``dtype`` (float32 by default, whatever the file stores).

    Raises:
        FormatError: a weight the network needs is missing or has another shape.
    """
    src = open_file(path)
    try:
        specs = {k: src.spec(k) for k in src.keys()}
        cfg = infer_config(specs)
        small = sum(s.numel for s in specs.values()) < 50_000_000
        # Small models are cheaper to build directly; large ones allocate nothing until to_empty.
        model = build_model(cfg, "cpu" if small else "meta", init=False)
        model = model.to(device) if small else model.to_empty(device=device)
        for name, t in model.state_dict(keep_vars=True).items():
            if name not in specs:
                if name.endswith("position_ids"):
                    t.data.copy_(torch.arange(t.shape[1]).unsqueeze(0))
                    continue
                raise FormatError(f"{path}: missing {name}", hint="loratool needs a full SD1 single-file checkpoint")
            if tuple(specs[name].shape) != tuple(t.shape):
                raise FormatError(f"{path}: {name} has shape {tuple(specs[name].shape)}, expected {tuple(t.shape)}",
                                  hint="the checkpoint's shapes are not consistent with SD1")
            t.data.copy_(src.get(name).to(device=device, dtype=t.dtype))
        return model if dtype == torch.float32 else model.to(dtype)
    finally:
        src.close()

