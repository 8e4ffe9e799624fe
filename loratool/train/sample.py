"""Text-to-image with the SD1 network: DDIM (η = 0) with classifier-free guidance, seeded.

LoRAs named in the prompt as ``<lora:NAME:WEIGHT>`` are merged into the weights in memory
(``W + weight·(alpha/rank)·ΔW`` through :func:`loratool.adapters.apply_to_weight`) and the tag is
removed from the text.

DDIM update for timestep ``t`` → ``t_prev`` (SD's "leading" spacing ``t = k·1000/steps + 1``):
``x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t``, ``x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂``, with
``ε̂ = ε̂_u + g·(ε̂_c − ε̂_u)`` (``g`` = guidance scale, ``ε̂_u`` for the empty prompt).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import apply_to_weight, load_adapter
from ..errors import LoratoolError
from ..io.source import open_file
from .data import make_tokenizer
from .model import StableDiffusion, alphas_cumprod

_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")
ADAPTER_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class LoraRef:
    name: str
    weight: float


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """Split A1111 prompt syntax: ``"a <lora:x:0.8> dog"`` → ``("a dog", [LoraRef("x", 0.8)])`` (weight 1 when absent)."""
    refs = []
    for m in _LORA_TAG.finditer(prompt):
        raw = (m.group(2) or "").strip()
        try:
            weight = float(raw) if raw else 1.0
        except ValueError:
            raise LoratoolError(f"<lora:{m.group(1)}:{raw}>: weight is not a number", hint="write e.g. <lora:name:0.8>") from None
        refs.append(LoraRef(m.group(1).strip(), weight))
    text = " ".join(_LORA_TAG.sub(" ", prompt).split())
    return text, refs


def find_lora(name: str, lora_dir: str | os.PathLike | None) -> Path:
    """``NAME`` as a path, or ``lora_dir/NAME.safetensors`` (then .pt, .ckpt, .bin)."""
    p = Path(name)
    if p.is_file():
        return p
    folders = [Path(lora_dir)] if lora_dir else []
    folders.append(Path.cwd())
    for folder in folders:
        for ext in ("", *ADAPTER_EXTENSIONS):
            c = folder / f"{name}{ext}"
            if c.is_file():
                return c
    raise LoratoolError(f"<lora:{name}>: no {name}.safetensors in {', '.join(str(f) for f in folders)}",
                        hint="pass --lora-dir DIR with the LoRA files")


def apply_lora(model: StableDiffusion, path: str | os.PathLike, weight: float) -> int:
    """Merge an adapter file into ``model``'s weights in place at ``weight``; returns the number of modules applied.

    Raises:
        MappingError / DetectionError: the adapter does not fit SD1 (from :func:`load_adapter`).
    """
    src = open_file(path)
    try:
        adapter = load_adapter(src, arch="sd1")
    finally:
        src.close()
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for module in adapter.modules.values():
            target = module.target
            p = params.get(target.address)
            if p is None:
                raise LoratoolError(f"{path}: {module.target.name} changes {target.address}, which the model lacks",
                                    hint="is the adapter for SD1?")
            if target.rows is None:
                p.copy_(apply_to_weight(p, module, weight).to(p.dtype))
            else:
                a, b = target.rows
                p[a:b].copy_(apply_to_weight(p[a:b], module, weight).to(p.dtype))
            n += 1
    return n


def ddim_timesteps(steps: int, total: int = 1000) -> list[int]:
    """SD's leading spacing with offset 1: ``[k·(total//steps) + 1 for k = steps−1 … 0]``."""
    if not 1 <= steps <= total:
        raise LoratoolError(f"--steps {steps}: must be between 1 and {total}", hint="20 to 50 is typical")
    stride = total // steps
    return [k * stride + 1 for k in reversed(range(steps))]


def parse_size(size: str | int, default: int) -> tuple[int, int]:
    """``"512"`` / ``"768x512"`` (width×height) → (w, h); sides must be multiples of 64."""
    if size is None or size == "":
        w = h = default
    elif isinstance(size, int):
        w = h = size
    else:
        parts = str(size).lower().split("x")
        try:
            w, h = (int(parts[0]), int(parts[-1]))
        except ValueError:
            raise LoratoolError(f"--size {size}: not WIDTHxHEIGHT", hint="e.g. --size 512 or --size 768x512") from None
    if w % 64 or h % 64 or w <= 0 or h <= 0:
        raise LoratoolError(f"--size {w}x{h}: sides must be positive multiples of 64",
                            hint="the VAE divides by 8 and the UNet halves three times")
    return w, h


@torch.no_grad()
def generate(
    model: StableDiffusion, prompt: str, size: tuple[int, int], steps: int = 20, seed: int = 0,
    guidance: float = 7.5, negative: str = "", tokenizer=None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One image (3, H, W) in [0, 1] for ``prompt`` (LoRA tags must already be applied and removed)."""
    device = torch.device(device)
    tok = tokenizer or make_tokenizer(model.text_encoder.cfg.vocab_size)
    ids = torch.tensor([tok(negative), tok(prompt)], dtype=torch.long, device=device)
    context = model.text_encoder(ids)
    w, h = size
    scale = model.cfg.latent_scale
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, model.cfg.unet.in_channels, h // scale, w // scale), generator=gen).to(device)
    ac = alphas_cumprod().to(device)
    ts = ddim_timesteps(steps)
    for i, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        eps_u, eps_c = model.unet(torch.cat([x, x]), torch.tensor([t, t], device=device), context).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    image = model.vae.decode(x)[0]
    return ((image.float().clamp(-1, 1) + 1) / 2).cpu()


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write (3,H,W) in [0,1] as an 8-bit PNG via a temporary file + rename."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    arr = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
