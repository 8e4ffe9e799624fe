"""Every output loratool writes: the container rule, the streaming writers, atomic folders, cleanup.

* :func:`container_for` is the one rule mapping an output path to its container (``.safetensors``;
  ``.ckpt/.pt/.pth/.bin`` torch zip pickle; a folder for diffusers layouts) — every command uses it.
* :class:`SafetensorsWriter` and :class:`CkptWriter` stream tensors one at a time into a temporary
  file beside the target and rename it into place when complete (:func:`open_writer` picks one).
* :class:`FolderOutput` does the same for a folder: a temporary folder beside the target, renamed
  into place at the end; only the files of the layout we write are ever replaced.
* :func:`check_output` refuses outputs that are inputs, hold inputs, exist without ``--force``, or
  are the current folder or one of its parents.

Streaming safetensors writer: header planned up front, tensors written one at a time.

The layout follows the safetensors format: 8-byte little-endian header length,
a JSON header (``{key: {dtype, shape, data_offsets}}`` plus ``__metadata__``)
padded with spaces so data starts 8-byte aligned, then the tensor bytes.

Because the final metadata (hashes, stats) is only known at the end, the header
is reserved with room to spare and rewritten in place on :meth:`finalize`. The
output goes to a temporary file in the destination folder and is renamed over
the target only when complete; any exception removes the temporary file.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InternalError, OutputError
from .source import PICKLE_SUFFIXES, TensorSpec

_RESERVE_EXTRA = 64 * 1024
_WRITEBACK_EVERY = 128 << 20


def container_for(path: str | os.PathLike, folder_ok: bool = False) -> str:
    """The container an output path names: ``safetensors``, ``pickle`` or ``folder``.

    ``.safetensors`` → safetensors; ``.ckpt``/``.pt``/``.pth``/``.bin`` → a torch zip pickle (what
    ``torch.save`` writes); a name without an extension → a folder, where the command writes one
    (``folder_ok``: diffusers layouts). Anything else is refused, so a file never carries bytes its
    name does not promise.

    Raises:
        OutputError: the extension names no container this command can write.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    if folder_ok and (not suffix or p.is_dir()):
        return "folder"
    hint = "name the output .safetensors, or .ckpt/.pt/.pth/.bin for a torch pickle"
    if folder_ok:
        hint += ", or a name without extension for a diffusers folder"
    raise OutputError(f"{p}: cannot tell the output container from the extension {suffix or '(none)'!r}", hint=hint)


def check_output(out: Path, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """Refuse an output that is one of the inputs, holds an input, is the current folder or one of
    its parents, or exists without ``force``.

    Returns the output path as given (checked against its resolved form).
    """
    out = Path(out)
    resolved = out.resolve()
    here = Path.cwd().resolve()
    if not out.name or out.name in (".", "..") or resolved == here or resolved in here.parents:
        raise OutputError(
            f"output {out} is the current folder or one of its parents",
            hint="name a new file or folder, e.g. -o out.safetensors or -o out-folder",
        )
    for inp in inputs:
        ip = Path(inp)
        same = ip.exists() and out.exists() and os.path.samefile(ip, out)
        if same or ip.resolve() == resolved:
            raise OutputError(f"output {out} is also an input", hint="write to a new file; inputs are never overwritten")
        if resolved in ip.resolve().parents:
            raise OutputError(f"output {out} contains the input {inp}", hint="write to a new folder; inputs are never changed")
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
        #: key → elements clamped by the cast to the planned dtype (see :func:`loratool.dtypes.cast`)
        self.clamped: dict[str, int] = {}
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._done = False

    def _fail(self, exc: OSError) -> OutputError:
        self._abort()
        return OutputError(f"writing {self.path} failed: {exc.strerror}", hint="free disk space and retry")

    def _prepare(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Check a planned tensor and return it flat, contiguous, on the CPU, in the planned dtype."""
        if key not in self.specs:
            raise InternalError(f"tensor {key!r} was not planned for {self.path}")
        if key in self._written:
            raise InternalError(f"tensor {key!r} written twice to {self.path}")
        spec = self.specs[key]
        if tuple(tensor.shape) != spec.shape:
            raise InternalError(f"tensor {key!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        t = self.cast(key, tensor.detach())
        if t.dtype != dtypes.to_torch(spec.dtype):
            raise InternalError(f"tensor {key!r} is {t.dtype}, planned {spec.dtype}")
        return t.to("cpu").contiguous().reshape(-1)

    def cast(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in ``key``'s planned dtype by the one clamp rule (:func:`loratool.dtypes.cast`),
        counting clamped values in :attr:`clamped`. The streaming engine calls it in the computing thread."""
        t, n = dtypes.cast(tensor, self.specs[key].dtype) if key in self.specs else (tensor, 0)
        if n:
            self.clamped[key] = n
        return t

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
            raise InternalError(f"{len(missing)} planned tensors never written, e.g. {missing[0]}")
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
        self._fh = open(self._tmp, "w+b", buffering=0)  # unbuffered: copy_file_range writes to the same fd
        self._pending_writeback = 0
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

    def _write_at(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._fh.seek(offset)
        while view:
            n = self._fh.write(view)
            view = view[n:]

    def _store(self, key: str, flat: torch.Tensor) -> None:
        start, end = self._offsets[key]
        if end > start:
            self._write_at(self.data_start + start, flat.view(torch.uint8).numpy())
            self._written_bytes(end - start)

    def _written_bytes(self, n: int) -> None:
        """Start the disk writeback of what is written so far every :data:`_WRITEBACK_EVERY` bytes.

        The kernel only begins writing dirty pages back at 10 % of RAM, so a 2 GB output would otherwise
        reach the disk only in the final ``fsync``, after all the computation; started early, the disk
        works while the next tensors are computed and the final ``fsync`` waits only for the tail.
        ``POSIX_FADV_DONTNEED`` starts that writeback without waiting (and drops pages already written).
        """
        self._pending_writeback += n
        if self._pending_writeback >= _WRITEBACK_EVERY and hasattr(os, "posix_fadvise"):
            self._pending_writeback = 0
            os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def copy_raw(self, key: str, fd: int, offset: int, nbytes: int, dtype: str) -> None:
        """Write a planned tensor by copying ``nbytes`` raw bytes from ``fd`` at ``offset`` (a tensor passed
        through unchanged: same dtype, same shape), in the kernel with ``copy_file_range`` where it can."""
        if key not in self.specs or key in self._written:
            raise InternalError(f"tensor {key!r} not planned for {self.path}, or written twice")
        start, end = self._offsets[key]
        if end - start != nbytes or self.specs[key].dtype != dtype:
            raise InternalError(f"raw copy of {key!r}: {nbytes} bytes {dtype}, planned {end - start} {self.specs[key].dtype}")
        try:
            _copy_range(fd, offset, self._fh.fileno(), self.data_start + start, nbytes)
            self._written_bytes(nbytes)
        except OSError as exc:
            raise self._fail(exc) from None
        self._written.add(key)

    def _commit(self) -> None:
        header = self._header_bytes(self.metadata)
        if len(header) <= self._reserved:
            header = header + b" " * (self._reserved - len(header))
            self._write_at(0, struct.pack("<Q", len(header)) + header)
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
                out.write(chunk)  # an unbuffered read may return less than asked; the loop goes on until b""
        self._fh.close()
        os.replace(tmp2, self._tmp)
        self._fh = open(self._tmp, "r+b")

    def _close_handle(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """Copy ``n`` bytes between file descriptors at explicit offsets: ``os.copy_file_range`` (no trip
    through user space), else ``pread``/``pwrite`` in 16 MiB blocks."""
    done = 0
    fast = hasattr(os, "copy_file_range")
    while done < n:
        if fast:
            try:
                got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                fast = False
                continue
            if got == 0:
                raise OSError(errno.EIO, "source ended early")
            done += got
            continue
        block = os.pread(src, min(n - done, 1 << 24), src_off + done)
        if not block:
            raise OSError(errno.EIO, "source ended early")
        view = memoryview(block)
        while view:
            w = os.pwrite(dst, view, dst_off + done)
            view, done = view[w:], done + w
