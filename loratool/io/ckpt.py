"""The streaming ``.ckpt`` writer: a torch zip pickle (``torch.load(weights_only=True)`` reads it), one tensor at a time."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .. import dtypes
from ..errors import OutputError
from .source import TensorSpec
from .writer import StreamingOutput

# torch.save writes these dtypes as typed storages with _rebuild_tensor_v2; newer dtypes (fp8)
# as an UntypedStorage (numel = bytes) with _rebuild_tensor_v3 and the dtype.
_LEGACY_STORAGE = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}
_ALIGN = 64


@dataclass(frozen=True)
class _StorageRef:
    record: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    shape: tuple[int, ...]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


class _RefPickler(pickle.Pickler):
    """Pickles tensor placeholders exactly as ``torch.save`` pickles tensors (storages by reference)."""

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            if obj.dtype in _LEGACY_STORAGE:
                return ("storage", getattr(torch, _LEGACY_STORAGE[obj.dtype]), obj.record, "cpu", obj.numel)
            nbytes = obj.numel * torch.empty((), dtype=obj.dtype).element_size()
            return ("storage", torch.UntypedStorage, obj.record, "cpu", nbytes)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _TensorRef):
            args = (obj.storage, 0, obj.shape, _contiguous_stride(obj.shape), False, OrderedDict())
            if obj.storage.dtype in _LEGACY_STORAGE:
                return torch._utils._rebuild_tensor_v2, args
            return torch._utils._rebuild_tensor_v3, (*args, obj.storage.dtype)
        return NotImplemented


class CkptWriter(StreamingOutput):
    """Write a zip-format torch file (what ``torch.save`` writes) tensor by tensor.

    The pickle (``archive/data.pkl``) only names storages, so it is written first from the planned
    specs; each tensor's bytes then go to their own stored (uncompressed) record, 64-byte aligned
    like torch's (``torch.load(..., mmap=True)`` works). Memory is bounded by the largest tensor.
    ``torch.load(path, weights_only=True)`` and loratool's allow-list reader both read the result.

    Args:
        path: output file; ``wrap``: put the tensors under ``{"state_dict": ...}`` (full checkpoints,
            as LDM/A1111 expect) or write the plain dict (LoRAs, as kohya's loaders expect).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
        force: bool = False,
        wrap: bool = True,
    ):
        super().__init__(path, specs, metadata, inputs, force)
        self._records = {k: str(i) for i, k in enumerate(self.specs)}
        try:
            self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            refs = {
                k: _TensorRef(_StorageRef(self._records[k], dtypes.to_torch(s.dtype), s.numel), tuple(s.shape))
                for k, s in self.specs.items()
            }
            obj = {"state_dict": refs} if wrap else refs
            buf = io.BytesIO()
            _RefPickler(buf, protocol=2).dump(obj)
            self._record("data.pkl", buf.getvalue())
        except OSError as exc:
            self._abort()
            raise OutputError(f"cannot create {self.path}: {exc.strerror}", hint="check the folder and free disk space") from None

    def _record(self, name: str, data: bytes | memoryview) -> None:
        info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        size = len(data) if isinstance(data, bytes) else data.nbytes
        zip64 = size > 0x7FFFFFFF
        # Local header: 30 bytes + name + extra (+ 20 bytes zip64 extra). Pad the extra field so the
        # record's data starts on a 64-byte boundary (torch's own files do the same).
        start = self._zip.fp.tell()
        base = 30 + len(info.filename.encode()) + (20 if zip64 else 0) + 4
        pad = (-(start + base)) % _ALIGN
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        with self._zip.open(info, "w", force_zip64=zip64) as fh:
            fh.write(data)

    def _store(self, key: str, flat: torch.Tensor) -> None:
        self._record(f"data/{self._records[key]}", memoryview(flat.view(torch.uint8).numpy()))

    def _commit(self) -> None:
        """Write the version records and close the archive. Metadata is not stored in pickles."""
        self._record("version", b"3\n")
        self._record("byteorder", b"little")
        self._zip.close()

    def _close_handle(self) -> None:
        self._zip.close()
