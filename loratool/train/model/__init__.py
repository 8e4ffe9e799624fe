"""SD1 in pure torch, with single-file (LDM) parameter names; sized from a checkpoint's shapes."""

from .config import SDConfig, TextConfig, UNetConfig, VAEConfig, infer_config
from .sd import (
    TINY_CONFIG,
    StableDiffusion,
    alphas_cumprod,
    build_model,
    checkpoint_tensors,
    load_model,
    make_tiny,
    schedule_tensors,
    tiny_specs,
)

__all__ = [
    "SDConfig", "TextConfig", "UNetConfig", "VAEConfig", "infer_config", "TINY_CONFIG", "StableDiffusion",
    "alphas_cumprod", "build_model", "checkpoint_tensors", "load_model", "make_tiny", "schedule_tensors", "tiny_specs",
]
