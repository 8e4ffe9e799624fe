"""The container rule applied: the streaming writer for an output path, and small in-memory saves."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .. import dtypes
from .ckpt import CkptWriter
from .source import TensorSpec
from .writer import SafetensorsWriter, StreamingOutput, container_for


def open_writer(
    out: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    wrap: bool = False,
) -> StreamingOutput:
    """The streaming writer for ``out``'s container (:func:`container_for`): both have
    ``write(key, tensor)`` and ``finalize(metadata)``. ``wrap`` puts a pickle's tensors under
    ``state_dict`` (full checkpoints, as LDM/A1111 expect); adapters are written as a plain dict.
    A pickle has no metadata field: ``metadata`` is only stored in safetensors files.
    """
    if container_for(out) == "safetensors":
        return SafetensorsWriter(out, specs, metadata, inputs=inputs, force=force)
    return CkptWriter(out, specs, None, inputs=inputs, force=force, wrap=wrap)


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    wrap: bool = False,
) -> Path:
    """Write an in-memory dict of tensors (small files: LoRAs, fixtures) in the container ``path`` names."""
    specs = {k: TensorSpec(tuple(v.shape), dtypes.name_of(v.dtype)) for k, v in tensors.items()}
    with open_writer(path, specs, metadata, inputs, force, wrap) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.finalize(metadata if isinstance(w, SafetensorsWriter) else None)
