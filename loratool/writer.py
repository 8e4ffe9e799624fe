"""Streaming safetensors writer: header planned up front, tensors written one at a time.

The layout follows the safetensors format: 8-byte little-endian header length,
a JSON header (``{key: {dtype, shape, data_offsets}}`` plus ``__metadata__``)
padded with spaces so data starts 8-byte aligned, then the tensor bytes.

Because the final metadata (hashes, stats) is only known at the end, the header
is reserved with room to spare and rewritten in place on :meth:`finalize`. The
output goes to a temporary file in the destination folder and is renamed over
the target only when complete; any exception removes the temporary file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from . import dtypes
from .errors import LoratoolError, OutputError
from .source import TensorSpec

_RESERVE_EXTRA = 64 * 1024


def check_output(out: Path, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """Refuse an output that is one of the inputs, or exists without ``force``.

    Returns the resolved output path.
    """
    out = Path(out)
    for inp in inputs:
        ip = Path(inp)
        if ip.exists() and out.exists() and os.path.samefile(ip, out):
            raise OutputError(f"output {out} is also an input", hint="write to a new file; inputs are never overwritten")
        if ip.resolve() == out.resolve():
            raise OutputError(f"output {out} is also an input", hint="write to a new file; inputs are never overwritten")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists", hint="pass --force to replace it, or choose another name")
    if not out.parent.exists():
        raise OutputError(f"folder {out.parent} does not exist", hint="create it first")
    return out


# safetensors orders tensor data by its Dtype enum, descending, then by name. Using the same order
# keeps every tensor aligned and makes our data region byte-identical to ``safetensors.torch.save``'s
# (so kohya's ``sshs_model_hash``, a hash of that region, agrees).
_SAFETENSORS_DTYPE_RANK = {
    name: i
    for i, name in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
         "F64", "I64", "U64"]
    )
}


def _order(specs: Mapping[str, TensorSpec]) -> list[str]:
    return sorted(specs, key=lambda k: (-_SAFETENSORS_DTYPE_RANK[specs[k].dtype], k))


class StreamingOutput:
    """What every streaming writer shares: output checks, the temp file, per-tensor checks, cleanup.

    Subclasses open ``self._tmp``, implement ``_store(key, tensor)`` and ``_commit()`` (write the
    trailer/header and close), and ``_close_handle()``. ``finalize`` renames the temp file into place;
    any exception (also in a ``with`` block) removes it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
        force: bool = False,
    ):
        self.path = check_output(Path(path), inputs, force)
        self.specs = dict(specs)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._written: set[str] = set()
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._done = False

    def _fail(self, exc: OSError) -> OutputError:
        self._abort()
        return OutputError(f"writing {self.path} failed: {exc.strerror}", hint="free disk space and retry")

    def _prepare(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Check a planned tensor and return it flat, contiguous, on the CPU, in the planned dtype."""
        if key not in self.specs:
            raise LoratoolError(f"internal: tensor {key!r} was not planned for {self.path}")
        if key in self._written:
            raise LoratoolError(f"internal: tensor {key!r} written twice to {self.path}")
        spec = self.specs[key]
        if tuple(tensor.shape) != spec.shape:
            raise LoratoolError(f"internal: tensor {key!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        t = tensor.detach()
        want = dtypes.to_torch(spec.dtype)
        if t.dtype != want:
            t = t.to(want)
        return t.to("cpu").contiguous().reshape(-1)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor; it is cast to the planned dtype, and its shape must match."""
        t = self._prepare(key, tensor)
        try:
            self._store(key, t)
        except OSError as exc:
            raise self._fail(exc) from None
        self._written.add(key)

    def finalize(self, metadata: Mapping[str, str] | None = None) -> Path:
        """Finish the file (with ``metadata`` if given), flush it to disk and rename it into place."""
        missing = [k for k in self.specs if k not in self._written]
        if missing:
            self._abort()
            raise LoratoolError(f"internal: {len(missing)} planned tensors never written, e.g. {missing[0]}")
        if metadata is not None:
            self.metadata = {str(k): str(v) for k, v in metadata.items()}
        try:
            self._commit()
            with open(self._tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise self._fail(exc) from None
        self._done = True
        return self.path

    def _store(self, key: str, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _close_handle(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        try:
            self._close_handle()
        except Exception:  # noqa: BLE001 - closing a half-written file may fail any way; it is deleted next
            pass
        try:
            self._tmp.unlink()
        except OSError:
            pass
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
        elif not self._done:
            self.finalize()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._abort()


class SafetensorsWriter(StreamingOutput):
    """Write a safetensors file tensor by tensor.

    Args:
        path: final output path (checked with :func:`check_output`).
        specs: every tensor the file will hold, with shape and dtype name.
        metadata: string metadata; may be replaced at :meth:`finalize`.
        inputs: input paths the output must not equal.
        force: allow replacing an existing output.

    Example:
        >>> with SafetensorsWriter(out, {"w": TensorSpec((2, 2), "F16")}) as w:  # doctest: +SKIP
        ...     w.write("w", torch.zeros(2, 2))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
        force: bool = False,
    ):
        super().__init__(path, specs, metadata, inputs, force)
        self._order = _order(self.specs)
        self._offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for k in self._order:
            n = self.specs[k].nbytes
            self._offsets[k] = (pos, pos + n)
            pos += n
        self._data_size = pos
        first = self._header_bytes(self.metadata)
        self._reserved = len(first) + max(_RESERVE_EXTRA, len(first) // 8)
        self._reserved += (-(8 + self._reserved)) % 8
        self._fh = open(self._tmp, "w+b")
        try:
            self._fh.truncate(8 + self._reserved + self._data_size)
        except OSError as exc:
            raise self._fail(exc) from None

    def _header_bytes(self, metadata: Mapping[str, str]) -> bytes:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        for k in self._order:
            s = self.specs[k]
            header[k] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": list(self._offsets[k])}
        return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()

    @property
    def data_start(self) -> int:
        return 8 + self._reserved

    def _store(self, key: str, flat: torch.Tensor) -> None:
        start, end = self._offsets[key]
        if end > start:
            self._fh.seek(self.data_start + start)
            self._fh.write(memoryview(flat.view(torch.uint8).numpy()))

    def _commit(self) -> None:
        header = self._header_bytes(self.metadata)
        if len(header) <= self._reserved:
            header = header + b" " * (self._reserved - len(header))
            self._fh.seek(0)
            self._fh.write(struct.pack("<Q", len(header)))
            self._fh.write(header)
        else:
            self._rewrite_with_header(header)
        self._fh.close()

    def _rewrite_with_header(self, header: bytes) -> None:
        header = header + b" " * ((-(8 + len(header))) % 8)
        tmp2 = self._tmp.with_name(self._tmp.name + "2")
        with open(tmp2, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            self._fh.seek(self.data_start)
            while chunk := self._fh.read(1 << 24):
                out.write(chunk)
        self._fh.close()
        os.replace(tmp2, self._tmp)
        self._fh = open(self._tmp, "r+b")

    def _close_handle(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> Path:
    """Write an in-memory dict of tensors (small files: LoRAs, fixtures) through the same writer."""
    specs = {k: TensorSpec(tuple(v.shape), dtypes.name_of(v.dtype)) for k, v in tensors.items()}
    with SafetensorsWriter(path, specs, metadata, inputs, force) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.finalize()
