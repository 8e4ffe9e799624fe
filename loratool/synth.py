"""Seeded synthetic checkpoints and adapters with the real key names.

Shapes come from the layout tables; ``factor`` shrinks every model dimension
(dims ≥ 64 that ``factor`` divides) so fixtures stay tiny while keeping every
relation between tensors (LoRA factors fit their targets, fused q/k/v slices
scale with the tensor). ``factor=1`` gives full-size files for benchmarks.
Values depend only on (seed, key), so any subset is reproducible.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from . import dtypes
from .layouts import ModuleTarget, checkpoint_layout, kohya_modules, shrink_shape
from .source import TensorSpec
from .writer import SafetensorsWriter


def _generator(seed: int, key: str) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h & ((1 << 63) - 1))


def random_tensor(key: str, spec: TensorSpec, seed: int, std: float = 0.02) -> torch.Tensor:
    """Deterministic tensor for ``key``: normal(0, std) for floats; arange / zeros for integers."""
    dt = dtypes.to_torch(spec.dtype)
    if spec.dtype in dtypes.FLOAT_NAMES:
        t = torch.randn(spec.shape, generator=_generator(seed, key), dtype=torch.float32) * std
        if key.endswith("norm.weight") or key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
            t = t + 1.0
        return t.to(dt)
    if key.endswith("position_ids"):
        return torch.arange(spec.numel, dtype=dt).reshape(spec.shape)
    return torch.zeros(spec.shape, dtype=dt)


def checkpoint_specs(arch: str, naming: str = "ldm", factor: int = 64, dtype: str | None = None) -> dict[str, TensorSpec]:
    """Specs of a synthetic full checkpoint (``naming`` ldm or diffusers), shrunk by ``factor``.

    ``dtype`` (e.g. ``F32``) replaces the F16 of model weights; schedule buffers and integers keep theirs.
    """
    out = {}
    for key, spec in checkpoint_layout(arch, naming).items():
        dt = spec.dtype
        if dtype and dt == "F16":
            dt = dtype
        out[key] = TensorSpec(shrink_shape(spec.shape, factor), dt)
    return out


def make_checkpoint(arch: str, factor: int = 64, seed: int = 0, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """A synthetic single-file (LDM/SGM) checkpoint in memory."""
    return {k: random_tensor(k, s, seed) for k, s in checkpoint_specs(arch, "ldm", factor, dtype).items()}


def write_checkpoint(
    path: str | os.PathLike, arch: str, factor: int = 64, seed: int = 0, dtype: str | None = None, force: bool = False
) -> Path:
    """Stream a synthetic single-file checkpoint to ``path`` one tensor at a time (bounded memory)."""
    specs = checkpoint_specs(arch, "ldm", factor, dtype)
    meta = {"loratool.synthetic": f"{arch} factor={factor} seed={seed}"}
    with SafetensorsWriter(path, specs, meta, force=force) as w:
        for k, s in specs.items():
            w.write(k, random_tensor(k, s, seed))
        return w.finalize()


# ----------------------------------------------------------------------------- adapters


def _conv_kernel(target: ModuleTarget) -> tuple[int, ...]:
    if target.kind == "conv3x3":
        return tuple(target.shape[2:])
    if target.kind == "conv1x1":
        return (1, 1)
    return ()


def lora_module_specs(
    target: ModuleTarget, rank: int, factor: int, naming: str = "kohya"
) -> dict[str, tuple[int, ...]]:
    """Role → shape of a LoRA module (down/up). kohya keeps conv kernel dims (also its 1x1-conv
    LoRA on SD2's linear proj weights); other namings follow the target weight's own rank."""
    ts = shrink_shape(target.target_shape, factor)
    out_f, in_f = ts[0], ts[1]
    k = _conv_kernel(target) if (naming == "kohya" or len(target.shape) == 4) else ()
    if k:
        return {"down": (rank, in_f, *k), "up": (out_f, rank, 1, 1)}
    return {"down": (rank, in_f), "up": (out_f, rank)}


def iter_lora(
    arch: str,
    rank: int = 4,
    alpha: float = 1.0,
    factor: int = 64,
    seed: int = 0,
    naming: str = "kohya",
    dtype: str = "F16",
    components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"),
    modules: dict[str, ModuleTarget] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) of a synthetic LoRA over every module of ``arch`` (kohya default + conv).

    ``naming``: ``kohya`` (lora_down/lora_up/alpha), ``peft`` (lora_A/lora_B, no alpha) or
    ``diffusers`` (lora.down / lora_linear_layer.down, no alpha). Up weights are non-zero so ΔW ≠ 0.
    """
    targets = modules if modules is not None else kohya_modules(arch)
    for target in targets.values():
        if target.component not in components:
            continue
        if naming != "kohya" and target.kind == "conv3x3":
            continue
        shapes = lora_module_specs(target, rank, factor, naming)
        base = target.name if naming == "kohya" else target.peft_module
        down = random_tensor(base + ".down", TensorSpec(shapes["down"], dtype), seed, std=0.1)
        up = random_tensor(base + ".up", TensorSpec(shapes["up"], dtype), seed, std=0.1)
        if naming == "kohya":
            yield f"{base}.lora_down.weight", down
            yield f"{base}.lora_up.weight", up
            yield f"{base}.alpha", torch.tensor(float(alpha), dtype=dtypes.to_torch(dtype))
        elif naming == "peft":
            yield f"{base}.lora_A.weight", down
            yield f"{base}.lora_B.weight", up
        elif naming == "diffusers":
            mid = "lora" if target.component == "unet" else "lora_linear_layer"
            yield f"{base}.{mid}.down.weight", down
            yield f"{base}.{mid}.up.weight", up
        else:
            raise ValueError(f"unknown naming {naming!r}")


def make_lora(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """A synthetic LoRA in memory (see :func:`iter_lora` for the options)."""
    return dict(iter_lora(arch, **kwargs))
