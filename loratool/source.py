"""Lazy tensor sources: keys, shapes, dtypes and metadata without reading tensor data.

Every command reads model files through :func:`open_file`. A source never loads
the whole model: ``.safetensors`` files are memory-mapped by safetensors itself,
pickled torch files are unpickled with an allow-list and their storages read
one record at a time, and a diffusers folder is a set of component files seen as
one source with ``component/key`` names.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import dtypes
from .errors import FormatError, LoratoolError, UnsafePickleError

if TYPE_CHECKING:
    import torch


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
    """What every command reads. ``get`` is the only call that touches tensor data."""

    path: Path
    format: str
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...


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


class SafetensorsSource(_SourceBase):
    """A ``.safetensors`` file: header validated and read by ``safetensors.safe_open``; tensors read one at a time.

    ``header_size`` is the byte length of the JSON header, so ``8 + header_size`` is
    where tensor data starts (used for the kohya ``sshs_model_hash``).

    Tensor data is read with ``pread`` into a buffer owned by the returned tensor rather than through
    a memory map: mapped pages stay resident (and count in the process's RSS) until the file is closed,
    so streaming a 7 GB checkpoint through a map shows a 7 GB peak RSS; reading per tensor keeps the
    peak at the few tensors in flight.
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

    def close(self) -> None:
        self._handle = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- pickle

# Globals a torch checkpoint may name. Anything else is refused before it is called.
# Storage classes → safetensors dtype names (torch itself is not needed to read the pickle).
_STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class _DtypeName:
    """A torch dtype named in a pickle (``torch.float16``), kept as its safetensors name."""

    name: str


@dataclass
class _LazyStorage:
    record: str
    dtype: str  # safetensors name
    numel: int


@dataclass
class _LazyTensor:
    storage: _LazyStorage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str | None = None  # set when the storage is untyped (bytes)

    @property
    def element_dtype(self) -> str:
        return self.dtype or self.storage.dtype


class _InertObject:
    """Stands in for harmless foreign classes in old checkpoints (e.g. Lightning callbacks)."""

    qualname = "object"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _inert_class(module: str, name: str) -> type:
    return type(name, (_InertObject,), {"qualname": f"{module}.{name}"})


def _rebuild_tensor(storage, offset, size, stride, *args, **kwargs):
    if not isinstance(storage, _LazyStorage):
        raise UnsafePickleError("pickle rebuilds a tensor from something that is not a storage")
    return _LazyTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, *args, **kwargs):
    t = _rebuild_tensor(storage, offset, size, stride)
    if not isinstance(dtype, _DtypeName):
        raise UnsafePickleError("pickle rebuilds a tensor with an unknown dtype")
    t.dtype = dtype.name
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


def _numpy_scalar(dtype, data=None):
    import numpy as np

    if data is None:
        return np.zeros((), dtype=dtype)[()]
    return np.frombuffer(data if isinstance(data, bytes) else bytes(data), dtype=dtype)[0]


def _numpy_dtype(name, *args):
    import numpy as np

    return np.dtype(name)


def _codecs_encode(text, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"pickle asks for codec {encoding!r}")
    return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
# Classes whose instances old training checkpoints carry outside the weights; kept inert.
_INERT = {
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("__builtin__", "object"),
}
_TORCH_DTYPE_NAMES = {
    "float16", "float32", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "float8_e4m3fn", "float8_e5m2",
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, fh, source_name: str, records: set[str] | None):
        super().__init__(fh)
        self._source_name = source_name
        self._records = records

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage-type", _STORAGE_DTYPES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return ("storage-type", "U8")
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return _DtypeName(dtypes.name_of_attr(name))
        if (module, name) in _INERT:
            return _inert_class(module, name)
        raise UnsafePickleError(
            f"{self._source_name}: refused to load: the pickle asks for {module}.{name}, "
            "which is not on the allow-list (nothing was executed)",
            hint="only tensors and plain containers are loaded from pickles; convert the file with a "
            "trusted tool or get a .safetensors release",
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source_name}: unexpected persistent id in pickle")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if isinstance(storage_type, tuple) and storage_type[0] == "storage-type":
            dtype = storage_type[1]
        elif isinstance(storage_type, _DtypeName):
            dtype = storage_type.name
        else:
            raise UnsafePickleError(f"{self._source_name}: unknown storage type in pickle")
        if self._records is not None and str(key) not in self._records:
            raise FormatError(f"{self._source_name}: storage record {key} is missing from the archive")
        return _LazyStorage(str(key), dtype, int(numel))


def _unwrap_state_dict(obj: Any) -> tuple[dict, dict]:
    """Find the tensor dict inside a training checkpoint; return (tensors, extras)."""
    extras: dict[str, Any] = {}
    for _ in range(3):
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            extras.update({k: v for k, v in obj.items() if k != "state_dict"})
            obj = obj["state_dict"]
        else:
            break
    if not isinstance(obj, dict):
        raise FormatError("pickle holds no state dict", hint="expected a dict of tensors or {'state_dict': ...}")
    return obj, extras


def _flatten(obj: dict, prefix: str, out: dict, other: dict) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, _LazyTensor):
            out[name] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (_LazyTensor, dict)) for x in v.values()):
            _flatten(v, name + ".", out, other)
        else:
            other[name] = v


class PickleSource(_SourceBase):
    """A zip-format torch file (``.ckpt``/``.pt``/``.pth``/``.bin``) read with an allow-list unpickler.

    Tensor data stays in the archive until :meth:`get` reads that one record.
    ``extras`` holds the non-tensor entries (``epoch``, ``global_step``...) for display.
    """

    format = "pickle"

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.stat().st_size == 0:
            raise FormatError(f"{self.path}: file is empty", hint="download it again")
        if not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as fh:
                head = fh.read(4)
            if head == b"PK\x03\x04":  # a zip's first record, but no end-of-archive record: cut short
                raise FormatError(
                    f"{self.path}: the zip archive is truncated (its end-of-archive record is missing)",
                    hint="the download or copy stopped early; get the file again",
                )
            raise FormatError(
                f"{self.path}: not a zip-format torch file (legacy or raw pickles are not read)",
                hint="re-save it with torch >= 1.6 in a trusted environment, or use a .safetensors release",
            )
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FormatError(f"{self.path}: corrupt zip archive ({_first_line(exc)})", hint="download it again") from None
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise FormatError(f"{self.path}: expected one data.pkl record, found {len(pkl)}", hint="not a torch file")
        self._root = pkl[0][: -len("data.pkl")]
        records = {n[len(self._root) + len("data/"):] for n in names if n.startswith(self._root + "data/")}
        try:
            with self._zip.open(pkl[0]) as fh:
                obj = _AllowListUnpickler(fh, str(self.path), records).load()
        except LoratoolError:
            raise
        except Exception as exc:
            raise FormatError(
                f"{self.path}: cannot unpickle ({_first_line(exc)})", hint="the file is corrupt or truncated"
            ) from None
        tensors, extras = _unwrap_state_dict(obj)
        flat: dict[str, _LazyTensor] = {}
        other: dict[str, Any] = {}
        _flatten(tensors, "", flat, other)
        self._lazy = flat
        self.extras = {**extras, **other}
        self._specs = {k: TensorSpec(t.size, t.element_dtype) for k, t in flat.items()}
        self.metadata = {}

    def get(self, key: str) -> torch.Tensor:
        self.spec(key)
        lt = self._lazy[key]
        st = lt.storage
        try:
            raw = self._zip.read(f"{self._root}data/{st.record}")
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FormatError(f"{self.path}: cannot read tensor {key} ({_first_line(exc)})", hint="file is corrupt") from None
        import torch

        nbytes = st.numel * dtypes.itemsize(st.dtype)
        if len(raw) < nbytes:
            raise FormatError(f"{self.path}: tensor {key} record is truncated", hint="download the file again")
        dt = dtypes.to_torch(lt.element_dtype)
        count = nbytes // dtypes.itemsize(lt.element_dtype)
        flat = torch.frombuffer(bytearray(raw[:nbytes]), dtype=dt) if count else torch.empty(0, dtype=dt)
        needed = lt.offset + sum((s - 1) * d for s, d in zip(lt.size, lt.stride)) + 1 if all(lt.size) else 0
        if needed > count:
            raise FormatError(f"{self.path}: tensor {key} reaches past its storage", hint="the file is corrupt")
        return torch.as_strided(flat, lt.size, lt.stride, lt.offset).clone()

    def close(self) -> None:
        self._zip.close()


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
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


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

    def get(self, key: str) -> torch.Tensor:
        self.spec(key)
        src, k = self._owner[key]
        return src.get(k)

    def raw_range(self, key: str) -> tuple[int, int, int] | None:
        self.spec(key)
        src, k = self._owner[key]
        return src.raw_range(k)

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
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder", hint="check the path")
    if p.is_dir():
        return DiffusersFolderSource(p)
    with open(p, "rb") as fh:
        head = fh.read(8)
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
