"""The one table between safetensors dtype names and torch dtypes.

torch is imported only when a torch dtype is asked for, so header-only work (``inspect`` of a
checkpoint) never pays for importing torch.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING

from .errors import LoratoolError

if TYPE_CHECKING:
    import torch

# Names as they appear in a safetensors header → (torch attribute, bytes per element).
_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    # types newer torch builds know; safetensors headers may name them too
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "C64": ("complex64", 8),
}
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# What users type on the command line.
CLI_NAMES: dict[str, str] = {
    "fp32": "F32",
    "float32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp64": "F64",
    "fp8_e4m3fn": "F8_E4M3",
    "fp8": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
}


@cache
def _torch_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    by_name = {n: getattr(torch, attr) for n, (attr, _) in _TABLE.items() if hasattr(torch, attr)}
    return by_name, {v: k for k, v in by_name.items()}


def __getattr__(name: str):
    if name == "TORCH_BY_NAME":
        return _torch_tables()[0]
    if name == "NAME_BY_TORCH":
        return _torch_tables()[1]
    raise AttributeError(name)


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    try:
        return _TABLE[name][1]
    except KeyError:
        raise LoratoolError(f"unknown dtype {name!r}", hint=f"one of {', '.join(_TABLE)}") from None


def to_torch(name: str) -> torch.dtype:
    try:
        return _torch_tables()[0][name]
    except KeyError:
        raise LoratoolError(f"unknown dtype {name!r}", hint=f"one of {', '.join(_TABLE)}") from None


def name_of(dtype: torch.dtype) -> str:
    try:
        return _torch_tables()[1][dtype]
    except KeyError:
        raise LoratoolError(f"dtype {dtype} cannot be stored in safetensors") from None


def name_of_attr(attr: str) -> str | None:
    """``"float16"`` → ``"F16"`` (torch attribute name to safetensors name), without importing torch."""
    for n, (a, _) in _TABLE.items():
        if a == attr:
            return n
    return None


#: The one ``--dtype`` choice set of every command.
CHOICES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")


def cast(t: torch.Tensor, name: str, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Cast a float tensor to the safetensors dtype ``name`` with the one rule every command uses.

    ``y = round_ne(clamp(x, -max, max))``: values beyond the target's largest finite value are
    clamped to it first (so no cast makes an infinity: plain torch gives ``inf`` for fp16 and
    fp8_e5m2), then torch rounds to nearest, ties to even. NaN stays NaN. Integer and bool tensors,
    and tensors already in the target dtype, are returned unchanged.

    ``out`` (a tensor of ``t``'s shape in the target dtype) receives the result instead of a new
    tensor: one pass from ``t`` straight into it (``t`` itself may then be clamped in place).

    Returns:
        (cast tensor, number of elements that were clamped, infinities included).

    Example:
        >>> import torch
        >>> y, n = cast(torch.tensor([1.0, 500.0, -1e6]), "F8_E4M3")
        >>> y.float().tolist(), n
        ([1.0, 448.0, -448.0], 2)
    """
    import torch

    target = to_torch(name)
    if t.dtype == target or not t.is_floating_point():
        if out is not None:
            out.copy_(t)
            return out, 0
        return t, 0
    clamped = 0
    if target.is_floating_point:
        limit = torch.finfo(target).max
        if torch.finfo(t.dtype).max > limit and t.numel():
            t = _with_kernels(t)  # fp8 (e5m2 → e4m3) has no aminmax, abs or clamp kernels
            lo, hi = torch.aminmax(t)  # one pass, no temporary: the common case (in range) ends here
            if not (float(hi) <= limit and float(lo) >= -limit):  # out of range, or NaN present
                over = t.abs() > limit  # NaN compares False and stays NaN
                clamped = int(over.sum())
                if clamped:
                    t = t.clamp_(-limit, limit) if out is not None else t.clamp(-limit, limit)
    if (t.dtype, target) in _via_float32() and t.numel() >= CAST_BLOCK and (out is None or out.is_contiguous()):
        dst = out if out is not None else torch.empty(t.shape, dtype=target)
        _cast_via_float32(t, dst)
        return dst, clamped
    if out is not None:
        out.copy_(t)
        return out, clamped
    return t.to(target), clamped


#: Elements per block of a cast through float32: 1 MiB of float32 stays in cache between its two copies.
CAST_BLOCK = 1 << 18


def _with_kernels(t: torch.Tensor) -> torch.Tensor:
    """``t``, or ``t.float()`` for fp8, which has no reduction or comparison kernels (exact: every fp8
    value is a float32)."""
    import torch

    return t if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else t.float()


@cache  # consulted for every cast, once per 1 MiB block in a blocked merge
def _via_float32() -> frozenset:
    """Casts that torch does faster as two vectorized copies through a float32 block than in one
    (measured, one thread, 14.7 M elements: fp16→bf16 2.0 → 0.7 ns per element, fp16→fp8_e4m3fn
    2.3 → 1.3, fp16→fp8_e5m2 1.8 → 0.8, fp8_e5m2→bf16 1.5 → 1.0, fp8_e5m2→fp8_e4m3fn 2.8 → 1.6;
    every other pair is as fast or faster directly). Both ways round the same exact float32 value
    (every fp16 and fp8 value is one) to nearest, ties to even: the same result, except the bit pattern
    of a NaN (torch's float32→bf16 copy writes 0xFFFF, its fp16→bf16 copy 0x7FC0)."""
    import torch

    f16, bf16, e4, e5 = torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
    return frozenset({(f16, bf16), (f16, e4), (f16, e5), (e5, bf16), (e5, e4)})


def _cast_via_float32(t: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(t)`` a :data:`CAST_BLOCK` at a time through a reused float32 block, the blocks
    split over the row workers (:func:`loratool.runtime.split_rows`; the result does not depend on
    their number: each element is converted alone)."""
    import torch

    from .runtime import split_rows

    src, out = t.reshape(-1), dst.view(-1)

    def run(a: int, b: int) -> None:
        buf = torch.empty(min(CAST_BLOCK, b - a))
        for i in range(a, b, CAST_BLOCK):
            j = min(b, i + CAST_BLOCK)
            block = buf[: j - i]
            block.copy_(src[i:j])
            out[i:j].copy_(block)

    split_rows(src.numel(), CAST_BLOCK, run)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of a tensor is NaN or ±Inf (integer tensors always are).

    One pass with no temporary: ``aminmax`` propagates NaN, and an infinity is the min or the max
    (10x cheaper than ``isfinite(t).all()`` on fp16). fp8 has no kernel for it and is widened first.
    """
    import torch

    if not t.is_floating_point() or not t.numel():
        return True
    lo, hi = torch.aminmax(_with_kernels(t))
    return abs(float(lo)) < math.inf and abs(float(hi)) < math.inf


def float_max(name: str) -> float:
    """Largest finite value of a float dtype name (``F8_E4M3`` → 448, ``F8_E5M2`` → 57344, ``F16`` → 65504)."""
    import torch

    return float(torch.finfo(to_torch(name)).max)


def exact_scalar(value: float, name: str) -> torch.Tensor:
    """A 0-d tensor holding ``value`` in dtype ``name`` if that dtype represents it exactly, else in
    float32 if that does, else float64 (a LoRA ``alpha``: alpha/rank scales the whole module, and
    0.3 in fp16 is 0.2998, so an inexact save dtype is not used for it). Readers accept any float dtype.
    """
    import torch

    want = to_torch(name)
    for dt in (want, torch.float32, torch.float64):
        if not dt.is_floating_point:
            continue
        t = torch.tensor(value, dtype=torch.float64).to(dt)
        if float(t.double()) == float(value):
            return t
    return torch.tensor(value, dtype=torch.float64)


def parse_cli(text: str) -> str:
    """``fp16`` / ``bf16`` / ``F16`` ... → safetensors name; raises with the valid choices."""
    key = text.strip()
    if key in _TABLE:
        return key
    if key.lower() in CLI_NAMES:
        return CLI_NAMES[key.lower()]
    raise LoratoolError(
        f"unknown dtype {text!r}", hint=f"use one of {', '.join(CHOICES)}"
    )
