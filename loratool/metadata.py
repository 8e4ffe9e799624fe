"""File hashes and kohya / modelspec metadata helpers: pure functions on bytes, paths and dict[str, str]."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping

import torch

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of the whole file (civitai "SHA256"; its first 10 hex digits are A1111's AutoV2)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def autov2(sha256_hex: str) -> str:
    """A1111's short model hash: the first 10 hex digits of the file sha256."""
    return sha256_hex[:10]


def addnet_hash(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header).

    This is kohya's ``sshs_model_hash`` and the hash A1111 uses for LoRAs (its first 12 digits: "AutoV3").
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def legacy_hash(path: str | os.PathLike) -> str:
    """Old A1111 / additional-networks hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(_LEGACY_OFFSET)
        return hashlib.sha256(fh.read(_LEGACY_LENGTH)).hexdigest()[:8]


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as sd-scripts precomputes them before saving.

    kohya serialises the tensors with only the ``ss_*`` metadata and hashes that buffer; for the
    model hash only the tensor data counts, for the legacy hash 64 KiB at 1 MiB of the buffer.
    Meant for adapter-sized outputs (the buffer is built in memory).
    """
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = save({k: v.contiguous() for k, v in tensors.items()}, ss)
    (n,) = struct.unpack("<Q", buf[:8])
    model = hashlib.sha256(buf[8 + n:]).hexdigest()
    legacy = hashlib.sha256(buf[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model, legacy


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus fresh ``sshs_model_hash`` / ``sshs_legacy_hash`` (stale ones are replaced)."""
    out = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    model, legacy = kohya_hashes(tensors, out)
    out["sshs_model_hash"] = model
    out["sshs_legacy_hash"] = legacy
    return out


def parse_json_field(metadata: Mapping[str, str], key: str):
    """Decode a JSON-valued metadata field (``ss_tag_frequency``, ``ss_dataset_dirs``...); None if absent or broken."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None
