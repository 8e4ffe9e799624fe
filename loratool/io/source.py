"""Lazy tensor sources: keys, shapes, dtypes and metadata without reading tensor data.

Every command reads model files through :func:`open_file`. A source never loads
the whole model: a ``.safetensors`` header is validated by safetensors and each tensor read
on its own (or mapped, by the streaming engine, one tensor at a time),
pickled torch files are unpickled with an allow-list (:mod:`.pickle`) and their storages read
one record at a time, and a diffusers folder is a set of component files seen as
one source with ``component/key`` names.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import dtypes
from ..errors import FormatError, LoratoolError

if TYPE_CHECKING:
    import torch

    from .pickle import PickleSource


@dataclass(frozen=True)
class TensorSpec:
    """Shape and safetensors dtype name of one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


class TensorSource(Protocol):
    """What every command reads: keys, specs and metadata from the header; ``get`` is the only call that
    touches tensor data. Sources are context managers (``with open_file(p) as src``)."""

    path: Path
    format: str  # "safetensors" | "pickle" | "diffusers" | "memory"
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def specs(self) -> dict[str, TensorSpec]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...

    def __enter__(self) -> TensorSource: ...

    def __exit__(self, *exc: object) -> None: ...


def _spec_of(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), dtypes.name_of(t.dtype))


class _SourceBase:
    path: Path
    format: str
    metadata: dict[str, str]
    _specs: dict[str, TensorSpec]

    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, key: str) -> TensorSpec:
        try:
            return self._specs[key]
        except KeyError:
            raise LoratoolError(f"{self.path}: no tensor named {key!r}") from None

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def __contains__(self, key: str) -> bool:
        return key in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def raw_range(self, key: str) -> tuple[int, int, int] | None:
        """``(fd, offset, nbytes)`` of the tensor's raw little-endian bytes in an open file, when the
        container stores them contiguously (safetensors); None otherwise. Lets a writer copy a tensor
        passed through unchanged without reading it into memory."""
        return None


# ----------------------------------------------------------------------------- safetensors

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python names it from 3.13 on


class SafetensorsSource(_SourceBase):
    """A ``.safetensors`` file: header validated and read by ``safetensors.safe_open``; tensors read one at a time.

    ``header_size`` is the byte length of the JSON header, so ``8 + header_size`` is
    where tensor data starts (used for the kohya ``sshs_model_hash``).

    ``get`` reads tensor data with ``pread`` into a buffer owned by the returned tensor rather than
    through a memory map: mapped pages stay resident (and count in the process's RSS) until unmapped,
    so a caller holding a map of a 7 GB checkpoint shows a 7 GB peak RSS. Only the streaming engine,
    which knows when each tensor is done with, uses the map (:meth:`mapped`, :meth:`drop`).
    """

    format = "safetensors"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise FormatError(
                f"{self.path}: file is {size} bytes, too short to be safetensors",
                hint="the file is empty or truncated; download it again",
            )
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise FormatError(
                f"{self.path}: safetensors header claims {n} bytes but the file has {size - 8} after it",
                hint="the file is truncated or not safetensors; download it again",
            )
        self.header_size = n
        self._offsets: dict[str, tuple[int, int]] | None = None
        self._fd: int | None = None
        self._map: mmap.mmap | bool | None = None  # see mapped(); False: the file cannot be mapped
        try:
            # The numpy view reads the header without importing torch; tensors come from a torch view.
            self._handle = safe_open(str(self.path), framework="numpy")
        except Exception as exc:  # safetensors raises SafetensorError / OSError with a message
            raise FormatError(
                f"{self.path}: not a valid safetensors file ({_first_line(exc)})",
                hint="the header is corrupt or the file is truncated; download it again",
            ) from None
        self.metadata = dict(self._handle.metadata() or {})
        self._specs = {}
        for key in self._handle.keys():
            sl = self._handle.get_slice(key)
            self._specs[key] = TensorSpec(tuple(sl.get_shape()), sl.get_dtype())

    def _data_offsets(self) -> dict[str, tuple[int, int]]:
        # safe_open has already validated this header (offsets contiguous, in range, sizes matching
        # shapes and dtypes); only the offsets, which safetensors does not expose, are taken from it.
        if self._offsets is None:
            with open(self.path, "rb") as fh:
                fh.seek(8)
                header = json.loads(fh.read(self.header_size))
            start = 8 + self.header_size
            self._offsets = {
                k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
                for k, v in header.items()
                if k != "__metadata__"
            }
        return self._offsets

    def raw_range(self, key: str) -> tuple[int, int, int]:
        self.spec(key)
        begin, end = self._data_offsets()[key]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd, begin, end - begin

    def get(self, key: str) -> torch.Tensor:
        import torch

        spec = self.spec(key)
        begin, end = self._data_offsets()[key]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        dt = dtypes.to_torch(spec.dtype)
        if end == begin:
            return torch.empty(spec.shape, dtype=dt)
        raw = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled (a bytearray is, holding the GIL)
        view, done = memoryview(raw.numpy()), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], begin + done)
            if got <= 0:
                raise FormatError(f"{self.path}: file ended inside tensor {key}", hint="the file is truncated")
            done += got
        return raw.view(dt).reshape(spec.shape)

    def mapped(self, key: str) -> torch.Tensor | None:
        """The tensor as a view of a private (copy-on-write) memory map of the file: nothing is read
        until it is used, and a write to it never reaches the file. For the streaming engine, which
        calls :meth:`prefetch` first and :meth:`drop` once it is done with the tensor; None when the
        file cannot be mapped (the caller then uses :meth:`get`). The header was checked against the
        file's size at open; a file truncated by someone else while mapped ends the process (SIGBUS),
        as it would under safetensors' own map."""
        import torch

        if self._map is None:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            try:
                self._map = mmap.mmap(self._fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, AttributeError):  # a file system without mmap, an empty file, Windows
                self._map = False
        spec = self.spec(key)
        begin, end = self._data_offsets()[key]
        if not self._map or end == begin:
            return None
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=begin)
        return raw.view(dtypes.to_torch(spec.dtype)).reshape(spec.shape)

    def _pages(self, key: str, outer: bool) -> tuple[int, int]:
        begin, end = self._data_offsets()[key]
        if outer:
            return begin - begin % _PAGE, end
        first = -(-begin // _PAGE) * _PAGE
        return first, max(first, end - end % _PAGE)

    def prefetch(self, key: str) -> None:
        """Read a :meth:`mapped` tensor's pages in now (in the calling thread, so that a cold file is
        read by the engine's reader, not where the tensor is used)."""
        if self._map:
            a, b = self._pages(key, outer=True)
            if b > a:
                self._map.madvise(mmap.MADV_WILLNEED, a, b - a)  # the whole range's reads submitted at once
                try:
                    self._map.madvise(_MADV_POPULATE_READ, a, b - a)  # then wait for them and map the pages
                except OSError:  # before Linux 5.14: the read-ahead is started at least
                    pass

    def drop(self, key: str) -> None:
        """Unmap the whole pages of a :meth:`mapped` tensor that is no longer used (they stay in the page
        cache): the process's resident memory stays the tensors in flight, not the file."""
        if self._map:
            a, b = self._pages(key, outer=False)
            if b > a:
                self._map.madvise(mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        self._handle = None
        if self._map:
            try:
                self._map.close()
            except BufferError:  # tensors still view it: unmapped when the last of them goes
                pass
        self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- diffusers folder

_COMPONENT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")


@dataclass
class DiffusersFolderSource(_SourceBase):
    """A diffusers pipeline folder seen as one source; keys are ``component/key``."""

    path: Path
    format: str = "diffusers"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._parts: dict[str, _SourceBase] = {}
        self._specs = {}
        self._owner: dict[str, tuple[_SourceBase, str]] = {}
        found = False
        for comp in COMPONENTS:
            d = self.path / comp
            if not d.is_dir():
                continue
            files = _component_files(d)
            for f in files:
                src = open_file(f)
                self._parts[f"{comp}/{f.name}"] = src
                for k in src.keys():
                    name = f"{comp}/{k}"
                    self._specs[name] = src.spec(k)
                    self._owner[name] = (src, k)
                    found = True
        if not found:
            raise FormatError(
                f"{self.path}: folder has no unet/, text_encoder/, text_encoder_2/ or vae/ weights",
                hint="point at a diffusers pipeline folder (with model_index.json) or a single file",
            )
        index = self.path / "model_index.json"
        if index.is_file():
            self.metadata["model_index"] = index.read_text()
        for part in self._parts.values():  # the single file a loratool conversion made this folder from
            recorded = part.metadata.get("loratool.single_file_metadata")
            if recorded is not None:
                self.metadata["loratool.single_file_metadata"] = recorded
                break

    def get(self, key: str) -> torch.Tensor:
        self.spec(key)
        src, k = self._owner[key]
        return src.get(k)

    def raw_range(self, key: str) -> tuple[int, int, int] | None:
        self.spec(key)
        src, k = self._owner[key]
        return src.raw_range(k)

    def mapped(self, key: str) -> torch.Tensor | None:
        self.spec(key)
        src, k = self._owner[key]
        return src.mapped(k) if hasattr(src, "mapped") else None

    def prefetch(self, key: str) -> None:
        src, k = self._owner[key]
        if hasattr(src, "prefetch"):
            src.prefetch(k)

    def drop(self, key: str) -> None:
        src, k = self._owner[key]
        if hasattr(src, "drop"):
            src.drop(k)

    def close(self) -> None:
        for s in self._parts.values():
            s.close()


def _component_files(d: Path) -> list[Path]:
    shards = sorted(d.glob("*.safetensors.index.json")) or sorted(d.glob("*.bin.index.json"))
    if shards:
        weight_map = json.loads(shards[0].read_text()).get("weight_map", {})
        return sorted({d / v for v in weight_map.values()})
    for name in _COMPONENT_FILES:
        if (d / name).is_file():
            return [d / name]
    return []


# ----------------------------------------------------------------------------- in-memory


class MemorySource(_SourceBase):
    """A dict of tensors behind the source interface (tests, and results handed between steps)."""

    format = "memory"

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, path="<memory>"):
        self.path = Path(path)
        self._tensors = dict(tensors)
        self._specs = {k: _spec_of(v) for k, v in self._tensors.items()}
        self.metadata = dict(metadata or {})

    def get(self, key: str) -> torch.Tensor:
        self.spec(key)
        return self._tensors[key]


# ----------------------------------------------------------------------------- entry point

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: Every model-file extension loratool reads (safetensors first).
MODEL_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def open_file(path: str | os.PathLike) -> SafetensorsSource | PickleSource | DiffusersFolderSource:
    """Open a model file or diffusers folder lazily.

    Args:
        path: ``.safetensors``, ``.ckpt``/``.pt``/``.pth``/``.bin`` (zip-format torch), or a diffusers folder.

    Returns:
        A source whose ``keys()``, ``spec()`` and ``metadata`` cost no tensor reads.

    Raises:
        FormatError: the file is missing, empty, truncated or not a model file.
        UnsafePickleError: a pickle names a global outside the allow-list.
    """
    from .pickle import PickleSource

    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder", hint="check the path")
    if p.is_dir():
        return DiffusersFolderSource(p)
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"GGUF":
        raise FormatError(
            f"{p}: a GGUF file (llama.cpp / ComfyUI-GGUF quantization); loratool does not read quantized GGUF weights",
            hint="use the safetensors release, or dequantize it to safetensors first (e.g. with the gguf package)",
        )
    if head[:2] == b"PK":
        return PickleSource(p)
    if p.suffix.lower() == ".safetensors" or (len(head) == 8 and struct.unpack("<Q", head)[0] < p.stat().st_size):
        try:
            return SafetensorsSource(p)
        except FormatError:
            if p.suffix.lower() == ".safetensors":
                raise
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return PickleSource(p)
    raise FormatError(
        f"{p}: not a model file (neither safetensors nor a zip-format torch file)",
        hint="loratool reads .safetensors, .ckpt/.pt/.pth/.bin and diffusers folders",
    )
