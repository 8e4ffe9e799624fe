"""The one table between safetensors dtype names and torch dtypes."""

from __future__ import annotations

import torch

from .errors import LoratoolError

# Names as they appear in a safetensors header.
TORCH_BY_NAME: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Types newer torch builds know; safetensors headers may name them too.
_EXTRA = (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu"), ("C64", "complex64"))
for _name, _attr in _EXTRA:
    if hasattr(torch, _attr):
        TORCH_BY_NAME[_name] = getattr(torch, _attr)
NAME_BY_TORCH: dict[torch.dtype, str] = {v: k for k, v in TORCH_BY_NAME.items()}
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


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return torch.empty((), dtype=TORCH_BY_NAME[name]).element_size()


def to_torch(name: str) -> torch.dtype:
    try:
        return TORCH_BY_NAME[name]
    except KeyError:
        raise LoratoolError(f"unknown dtype {name!r}", hint=f"one of {', '.join(TORCH_BY_NAME)}") from None


def name_of(dtype: torch.dtype) -> str:
    try:
        return NAME_BY_TORCH[dtype]
    except KeyError:
        raise LoratoolError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_cli(text: str) -> str:
    """``fp16`` / ``bf16`` / ``F16`` ... → safetensors name; raises with the valid choices."""
    key = text.strip()
    if key in TORCH_BY_NAME:
        return key
    if key.lower() in CLI_NAMES:
        return CLI_NAMES[key.lower()]
    raise LoratoolError(
        f"unknown dtype {text!r}", hint="use one of fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2"
    )
