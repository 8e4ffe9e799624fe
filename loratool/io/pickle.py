"""Torch pickles (``.ckpt``/``.pt``/``.pth``/``.bin``) read without running their code.

The unpickler resolves only an allow-list of globals (tensor rebuilds, storage classes, a few
containers); anything else is refused before it is called. Storages are read one record at a time
from the zip when a tensor is asked for.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dtypes
from ..errors import FormatError, LoratoolError, UnsafePickleError
from .source import TensorSpec, _first_line, _SourceBase

if TYPE_CHECKING:
    import torch


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


