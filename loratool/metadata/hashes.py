"""File hashes (sha256, AutoV2, addnet/AutoV3, legacy) and kohya's precomputed ``sshs_*`` hashes."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def file_and_data_sha256(path: str | os.PathLike, is_safetensors: bool = True, chunk: int = 1 << 24) -> tuple[str, str | None]:
    """``(file_sha256(path), addnet_hash(path))`` in one read of the file (the addnet hash only for safetensors)."""
    from concurrent.futures import ThreadPoolExecutor

    whole = hashlib.sha256()
    data = hashlib.sha256() if is_safetensors else None
    # hashlib releases the GIL on large buffers: the two digests run on two cores.
    with open(path, "rb") as fh, ThreadPoolExecutor(max_workers=1) as pool:
        skip = 0
        if data is not None:
            head = fh.read(8)
            whole.update(head)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            skip = n
        while block := fh.read(chunk):
            pending = None
            if data is not None:
                if skip >= len(block):
                    skip -= len(block)
                else:
                    pending = pool.submit(data.update, memoryview(block)[skip:])
                    skip = 0
            whole.update(block)
            if pending is not None:
                pending.result()
    return whole.hexdigest(), data.hexdigest() if data is not None else None


@dataclass(frozen=True)
class HashReport:
    """File hashes as civitai / A1111 / kohya show them, and whether the stored ``sshs_*`` agree.

    ``model_match`` / ``legacy_match`` are None when the file stores no such hash (or it was not checked).
    """

    sha256: str
    autov2: str
    addnet: str | None
    addnet_short: str | None
    legacy: str
    stored_model: str | None
    stored_legacy: str | None
    model_match: bool | None
    legacy_match: bool | None


def hash_report(
    path: str | os.PathLike,
    metadata: Mapping[str, str],
    is_safetensors: bool = True,
    load_tensors: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> HashReport:
    """Compute every hash of ``path`` and compare with the stored kohya ``sshs_*`` values.

    The stored model hash is checked against the sha256 of the tensor data (the addnet hash).
    The stored legacy hash is over kohya's in-memory buffer (header with only ``ss_*`` metadata), so it
    is recomputed with :func:`kohya_hashes` from ``load_tensors()`` when given, else left unchecked.
    """
    sha, addnet = file_and_data_sha256(path, is_safetensors)
    stored_model = metadata.get("sshs_model_hash")
    stored_legacy = metadata.get("sshs_legacy_hash")
    model_match = legacy_match = None
    if stored_model is not None and addnet is not None:
        model_match = stored_model.lower() == addnet
    if stored_legacy is not None and load_tensors is not None:
        re_model, re_legacy = kohya_hashes(load_tensors(), metadata)
        legacy_match = stored_legacy.lower() == re_legacy
        if stored_model is not None and not model_match:
            model_match = stored_model.lower() == re_model
    return HashReport(
        sha256=sha,
        autov2=autov2(sha),
        addnet=addnet,
        addnet_short=addnet[:12] if addnet else None,
        legacy=legacy_hash(path),
        stored_model=stored_model,
        stored_legacy=stored_legacy,
        model_match=model_match,
        legacy_match=legacy_match,
    )
