"""Seeded synthetic checkpoints and adapters with the real key names.

Shapes come from the layout tables moved to a genuine shape config of the architecture:
:func:`tiny_config` divides every width of the released model by ``factor`` (a small model with
the same layout, which diffusers builds from the same numbers), so every relation between
tensors holds (LoRA factors fit their targets, fused q/k/v slices follow the width).
``factor=1`` is the released config: full-size files for benchmarks. Values depend only on
(seed, key), so any subset is reproducible.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from loratool import dtypes
from loratool.arch import ModuleTarget, checkpoint_layout, component_of, kohya_modules, shape_rules, standard_config
from loratool.arch.dims import ShapeConfig
from loratool.io.source import TensorSpec
from loratool.io.writer import SafetensorsWriter


def scaled(size: int, factor: int) -> int:
    """A released model's size in the 1/``factor`` model: widths (≥ 64 and divisible) are divided; kernel
    sizes, latent channels, the 77 positions and the 1000-step schedule stay."""
    return size // factor if factor > 1 and size >= 64 and size % factor == 0 else size


def scaled_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    return tuple(scaled(d, factor) for d in shape)


# A small genuine FLUX.1 config: 4 heads × 16 wide (RoPE axes 4+6+6), T5 width 32, CLIP pooled 16, and the
# released 64-wide packed latent; 19 double and 38 single blocks as released.
FLUX_SMALL = {"hidden_size": 64, "head_dim": 16, "context_dim": 32, "pooled_dim": 16, "text_width": 12,
              "t5_width": 32, "t5_ff": 80}  # fmt: skip


def tiny_config(arch: str, factor: int) -> ShapeConfig:
    """``arch``'s shape config with every width divided by ``factor`` (1: the released model). FLUX.1 at any
    factor > 1 is :data:`FLUX_SMALL` (its widths must stay multiples of the head size)."""
    std = standard_config(arch)
    if arch == "flux1" and factor > 1:
        return std.replace(**FLUX_SMALL)
    return std.replace(**{k: scaled(v, factor) for k, v in std.values})


def sized(target: ModuleTarget, arch: str, factor: int) -> ModuleTarget:
    """``target`` in the :func:`tiny_config` model."""
    return target.sized(tiny_config(arch, factor))


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
    """Specs of a synthetic full checkpoint (``naming`` ldm or diffusers) of ``tiny_config(arch, factor)``.

    ``dtype`` (e.g. ``F32``) replaces the F16 of model weights; schedule buffers and integers keep theirs.
    """
    out = {}
    rules, config = shape_rules(arch), tiny_config(arch, factor)
    for key, spec in checkpoint_layout(arch, naming).items():
        dt = spec.dtype
        if dtype and dt in ("F16", "BF16"):  # model weights (SD tables: F16, FLUX: BF16); schedules keep F32
            dt = dtype
        out[key] = TensorSpec(rules.shape(component_of(arch, key)[0], spec.shape, config, key), dt)
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
    target: ModuleTarget, rank: int, factor: int, naming: str = "kohya", arch: str = "sd1"
) -> dict[str, tuple[int, ...]]:
    """Role → shape of a LoRA module (down/up). kohya keeps conv kernel dims (also its 1x1-conv
    LoRA on SD2's linear proj weights); other namings follow the target weight's own rank."""
    ts = sized(target, arch, factor).target_shape
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
    components: tuple[str, ...] = ("unet", "transformer", "text_encoder", "text_encoder_2"),
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
        shapes = lora_module_specs(target, rank, factor, naming, arch)
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


# ----------------------------------------------------------------------------- LyCORIS adapters


def _rand(key: str, shape: tuple[int, ...], seed: int, dtype: str, std: float = 0.1) -> torch.Tensor:
    return random_tensor(key, TensorSpec(tuple(shape), dtype), seed, std=std)


def _alpha(alpha: float, dtype: str) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=dtypes.to_torch(dtype))


def _select(arch: str, components: tuple[str, ...], modules: dict[str, ModuleTarget] | None) -> list[ModuleTarget]:
    targets = modules if modules is not None else kohya_modules(arch)
    return [t for t in targets.values() if t.component in components]


def _factor_pair(dim: int, factor: int) -> tuple[int, int]:
    """``dim = m · n`` with m the largest divisor of ``dim`` not above ``factor`` (LyCORIS-like split)."""
    for m in range(min(factor, dim), 0, -1):
        if dim % m == 0:
            return m, dim // m
    return 1, dim


_ALL_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def make_loha(
    arch: str,
    rank: int = 4,
    alpha: float = 2.0,
    factor: int = 64,
    seed: int = 0,
    dtype: str = "F16",
    tucker: bool = False,
    components: tuple[str, ...] = _ALL_COMPONENTS,
    modules: dict[str, ModuleTarget] | None = None,
) -> dict[str, torch.Tensor]:
    """A synthetic LoHa (kohya names, ``hada_*`` keys). Conv factors are flattened to 2-D as LyCORIS stores
    them; with ``tucker`` the 3x3 convs get ``hada_t1``/``hada_t2`` (r,r,kh,kw) and (r,out)/(r,in) factors."""
    out: dict[str, torch.Tensor] = {}
    for t in _select(arch, components, modules):
        ts = sized(t, arch, factor).target_shape
        o, i = ts[0], ts[1]
        k = _conv_kernel(t) if len(t.shape) == 4 else ()
        n = t.name
        if tucker and t.kind == "conv3x3":
            for w in ("1", "2"):
                out[f"{n}.hada_t{w}"] = _rand(f"{n}.t{w}", (rank, rank, *k), seed, dtype)
                out[f"{n}.hada_w{w}_a"] = _rand(f"{n}.w{w}a", (rank, o), seed, dtype)
                out[f"{n}.hada_w{w}_b"] = _rand(f"{n}.w{w}b", (rank, i), seed, dtype)
        else:
            flat = i
            for d in k:
                flat *= d
            for w in ("1", "2"):
                out[f"{n}.hada_w{w}_a"] = _rand(f"{n}.w{w}a", (o, rank), seed, dtype)
                out[f"{n}.hada_w{w}_b"] = _rand(f"{n}.w{w}b", (rank, flat), seed, dtype)
        out[f"{n}.alpha"] = _alpha(alpha, dtype)
    return out


LOKR_VARIANTS = ("w1_full+w2_lowrank", "w1_full+w2_full", "w1_lowrank+w2_lowrank", "w1_lowrank+w2_full", "w1_full+w2_tucker")


def make_lokr(
    arch: str,
    rank: int = 2,
    alpha: float = 1.0,
    factor: int = 64,
    seed: int = 0,
    dtype: str = "F16",
    kron_factor: int = 4,
    variant: str = "mixed",
    components: tuple[str, ...] = _ALL_COMPONENTS,
    modules: dict[str, ModuleTarget] | None = None,
) -> dict[str, torch.Tensor]:
    """A synthetic LoKr (``lokr_*`` keys): ΔW = kron(w1 (a,c), w2 (b,d[,kh,kw])), out = a·b, in = c·d.

    ``variant`` is one of :data:`LOKR_VARIANTS` or ``mixed`` (cycle through them module by module;
    ``w2_tucker`` only applies to 3x3 convs, other modules fall back to ``w2_lowrank``). As LyCORIS does,
    a module with full w1 and full w2 stores ``alpha = rank`` (its scale is 1 anyway).
    """
    out: dict[str, torch.Tensor] = {}
    for idx, t in enumerate(_select(arch, components, modules)):
        ts = sized(t, arch, factor).target_shape
        o, i = ts[0], ts[1]
        k = _conv_kernel(t) if len(t.shape) == 4 else ()
        a, b = _factor_pair(o, kron_factor)
        c, d = _factor_pair(i, kron_factor)
        v = LOKR_VARIANTS[idx % len(LOKR_VARIANTS)] if variant == "mixed" else variant
        w1, w2 = v.split("+")
        if w2 == "w2_tucker" and not k:
            w2 = "w2_lowrank"
        n = t.name
        if w1 == "w1_full":
            out[f"{n}.lokr_w1"] = _rand(f"{n}.w1", (a, c), seed, dtype, std=0.5)
        else:
            out[f"{n}.lokr_w1_a"] = _rand(f"{n}.w1a", (a, rank), seed, dtype, std=0.5)
            out[f"{n}.lokr_w1_b"] = _rand(f"{n}.w1b", (rank, c), seed, dtype, std=0.5)
        flat = d
        for x in k:
            flat *= x
        if w2 == "w2_full":
            out[f"{n}.lokr_w2"] = _rand(f"{n}.w2", (b, d, *k), seed, dtype)
        elif w2 == "w2_tucker":
            out[f"{n}.lokr_t2"] = _rand(f"{n}.t2", (rank, rank, *k), seed, dtype)
            out[f"{n}.lokr_w2_a"] = _rand(f"{n}.w2a", (rank, b), seed, dtype)
            out[f"{n}.lokr_w2_b"] = _rand(f"{n}.w2b", (rank, d), seed, dtype)
        else:
            out[f"{n}.lokr_w2_a"] = _rand(f"{n}.w2a", (b, rank), seed, dtype)
            out[f"{n}.lokr_w2_b"] = _rand(f"{n}.w2b", (rank, flat), seed, dtype)
        full_both = w1 == "w1_full" and w2 == "w2_full"
        out[f"{n}.alpha"] = _alpha(rank if full_both else alpha, dtype)
    return out


def make_locon_tucker(
    arch: str,
    rank: int = 4,
    alpha: float = 2.0,
    factor: int = 64,
    seed: int = 0,
    dtype: str = "F16",
    components: tuple[str, ...] = _ALL_COMPONENTS,
    modules: dict[str, ModuleTarget] | None = None,
) -> dict[str, torch.Tensor]:
    """A synthetic LoCon with Tucker 3x3 convs: down (r,in,1,1), ``lora_mid`` (r,r,kh,kw), up (out,r,1,1);
    every other module is a plain kohya LoRA module."""
    out: dict[str, torch.Tensor] = {}
    for t in _select(arch, components, modules):
        n = t.name
        if t.kind == "conv3x3":
            ts = sized(t, arch, factor).target_shape
            out[f"{n}.lora_down.weight"] = _rand(f"{n}.down", (rank, ts[1], 1, 1), seed, dtype)
            out[f"{n}.lora_mid.weight"] = _rand(f"{n}.mid", (rank, rank, *t.shape[2:]), seed, dtype)
            out[f"{n}.lora_up.weight"] = _rand(f"{n}.up", (ts[0], rank, 1, 1), seed, dtype)
            out[f"{n}.alpha"] = _alpha(alpha, dtype)
        else:
            out.update(dict(iter_lora(arch, rank, alpha, factor, seed, "kohya", dtype, components, {n: t})))
    return out


def make_dora(
    arch: str,
    rank: int = 4,
    alpha: float = 2.0,
    factor: int = 64,
    seed: int = 0,
    dtype: str = "F16",
    axis: str = "out",
    components: tuple[str, ...] = _ALL_COMPONENTS,
    modules: dict[str, ModuleTarget] | None = None,
) -> dict[str, torch.Tensor]:
    """A synthetic kohya/LyCORIS DoRA: a LoRA plus ``dora_scale`` per module.

    ``axis="out"`` stores (out, 1[, 1, 1]) (LyCORIS ``wd_on_out=True``, today's default);
    ``axis="in"`` stores (1, in[, 1, 1]) (older LyCORIS). Magnitudes are positive, around 1.
    """
    out = dict(iter_lora(arch, rank, alpha, factor, seed, "kohya", dtype, components, modules))
    for t in _select(arch, components, modules):
        ts = sized(t, arch, factor).target_shape
        tail = [1] * (len(t.shape) - 2)
        shape = (ts[0], 1, *tail) if axis == "out" else (1, ts[1], *tail)
        mag = _rand(f"{t.name}.dora", shape, seed, "F32", std=0.1).abs() + 0.5
        out[f"{t.name}.dora_scale"] = mag.to(dtypes.to_torch(dtype))
    return out


def split_qkv_lora(hidden: int, rank: int = 4, alpha: float = 2.0, seed: int = 5):
    """A kohya ``split_qkv`` module on double block 1's ``img_attn.qkv`` (sd-scripts' layout: the three parts'
    downs stacked, the up block-diagonal, the per-part alpha): ``(tensors, downs, ups)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = "lora_unet_double_blocks_1_img_attn_qkv"
    downs = [torch.randn(rank, hidden, generator=g) for _ in range(3)]
    ups = [torch.randn(hidden, rank, generator=g) for _ in range(3)]
    up = torch.zeros(3 * hidden, 3 * rank)
    for i in range(3):
        up[i * hidden:(i + 1) * hidden, i * rank:(i + 1) * rank] = ups[i]
    tensors = {f"{n}.lora_down.weight": torch.cat(downs), f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(alpha)}
    return tensors, downs, ups
