"""A ComfyUI all-in-one FLUX.1 file ↔ its separate component files (ComfyUI's models/diffusion_models,
models/text_encoders and models/vae files), streamed tensor by tensor.

The names come from :data:`loratool.arch.flux.COMPONENT_FILES`: each component's key prefix in the all-in-one
file (``model.diffusion_model.``, ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``,
``vae.``) is removed for its own file and put back when joining, so split → join gives the same keys, tensors and
metadata (the metadata travels in the transformer file). Every key is accounted for: a key of the all-in-one file
under no component prefix, or a component file whose keys are not that component's, is an error listing them.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .. import dtypes
from ..arch import checkpoint_layout
from ..arch.flux import COMPONENT_FILES, COMPONENT_LABELS, SINGLE_FILE_PREFIX
from ..errors import MappingError, OutputError, listing
from ..io import stream
from ..io.folder import FolderOutput
from ..io.source import TensorSource, TensorSpec
from ..io.writer import SafetensorsWriter, check_output, container_for
from ..progress import Progress

OPTION_OF = {"text_encoder": "--clip-l", "text_encoder_2": "--t5", "vae": "--vae"}


@dataclass(frozen=True)
class ComponentsReport:
    """What a split or a join wrote; ``files`` is (component, path, tensors)."""

    input: str
    output: str
    direction: str  # split | join
    files: tuple[tuple[str, str, int], ...]
    dtype: str | None
    stream: stream.StreamStats | None = None

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "direction": self.direction,
            "dtype": self.dtype,
            "files": [{"component": c, "path": p, "tensors": n} for c, p, n in self.files],
            "stream": stream.stream_json(self.stream),
        }


def _outer(prefix: str) -> str:
    """The component's own prefix (``text_encoders.clip_l.``) of its key prefix (``….transformer.``)."""
    return prefix.removesuffix("transformer.") if prefix.startswith("text_encoders.") else prefix


def component_name(key: str) -> tuple[str, str] | None:
    """``(component, name in its own file)`` of an all-in-one key, or None when it belongs to no component."""
    for comp, _file, prefix, outside in COMPONENT_FILES:
        if key.startswith(prefix):
            return comp, key[len(prefix):]
        outer = _outer(prefix)
        if key.startswith(outer) and key[len(outer):] in outside:
            return comp, key[len(outer):]
    return None


def joined_key(comp: str, name: str) -> str:
    """The all-in-one key of ``name`` in component ``comp``'s own file."""
    _, _, prefix, outside = next(row for row in COMPONENT_FILES if row[0] == comp)
    return (_outer(prefix) if name in outside else prefix) + name


def _out_spec(spec: TensorSpec, dtype: str | None) -> TensorSpec:
    if dtype and spec.dtype in dtypes.FLOAT_NAMES:
        return TensorSpec(spec.shape, dtype)
    return spec


def split_components(source: TensorSource, out: str | os.PathLike, dtype: str | None = None, force: bool = False,
                     on_progress: Progress | None = None) -> ComponentsReport:
    """Write each component of a ComfyUI all-in-one FLUX file to its own file in folder ``out``."""
    by_comp: dict[str, dict[str, str]] = {}
    unmapped = []
    for key in source.keys():
        hit = component_name(key)
        if hit is None:
            unmapped.append(key)
        else:
            by_comp.setdefault(hit[0], {})[hit[1]] = key
    if unmapped:
        raise MappingError(
            f"{source.path}: {len(unmapped)} keys belong to no FLUX component: {listing(sorted(unmapped))}",
            hint="--to components splits ComfyUI all-in-one FLUX files (model.diffusion_model., text_encoders., vae.)",
        )
    if "transformer" not in by_comp:
        raise MappingError(f"{source.path}: no model.diffusion_model. keys; this is not a ComfyUI all-in-one file",
                           hint="a bare BFL transformer is already a component file")
    files = []
    with ExitStack() as stack:
        folder = stack.enter_context(FolderOutput(out, [source.path], force))
        items = []
        writers = []
        for comp, fname, _prefix, _outside in COMPONENT_FILES:
            names = by_comp.get(comp)
            if not names:
                continue
            specs = {n: _out_spec(source.spec(k), dtype) for n, k in names.items()}
            meta = dict(source.metadata) if comp == "transformer" else {}
            w = stack.enter_context(SafetensorsWriter(folder.tmp / fname, specs, meta))
            writers.append((w, meta))
            items += [stream.Item(w, n, (k,)) for n, k in names.items()]
            files.append((comp, str(folder.path / fname), len(names)))
        stats = stream.run(source, items, on_progress=on_progress)
        for w, meta in writers:
            w.finalize(meta)
        folder.commit()
    return ComponentsReport(str(source.path), str(Path(out)), "split", tuple(files), dtype, stats)


def _check_component(comp: str, source: TensorSource) -> None:
    """Refuse a file given for ``comp`` whose keys are not ``comp``'s (a T5 file passed as --clip-l...)."""
    names = set(source.keys())
    if comp == "transformer":
        bad = [n for n in names if n.startswith(("model.", "text_encoders.", "vae."))]
        if not bad:
            from ..detect import detect_file

            det = detect_file({n: source.spec(n) for n in names})
            ok = det.kind == "checkpoint" and det.arch == "flux1"
            bad = [] if ok else sorted(names)[:3]
    elif comp == "text_encoder":
        clip = {k.split("/", 1)[1] for k in checkpoint_layout("sd1", "diffusers") if k.startswith("text_encoder/")}
        clip |= {"text_projection.weight", "logit_scale", "text_model.embeddings.position_ids"}
        bad = sorted(names - clip)
    elif comp == "text_encoder_2":
        bad = sorted(n for n in names if not n.startswith(("encoder.", "shared.")))
    else:
        bad = sorted(names - set(checkpoint_layout("flux1", "ae")))
    if bad:
        raise MappingError(
            f"{source.path}: {len(bad)} keys are not FLUX {COMPONENT_LABELS[comp]} keys: {listing(bad)}",
            hint=f"check which file was given for {OPTION_OF.get(comp, 'the transformer')}",
        )


def join_components(parts: dict[str, TensorSource], out: str | os.PathLike, dtype: str | None = None,
                    force: bool = False, on_progress: Progress | None = None) -> ComponentsReport:
    """Write one ComfyUI all-in-one FLUX file from component files (``transformer`` required; ``text_encoder``,
    ``text_encoder_2``, ``vae`` optional), keys prefixed as ComfyUI saves them."""
    out = Path(out)
    check_output(out, [s.path for s in parts.values()], force)
    if container_for(out) != "safetensors":
        raise OutputError(f"{out}: an all-in-one FLUX file is written as .safetensors", hint="name it .safetensors")
    specs: dict[str, TensorSpec] = {}
    plan = []
    for comp, _fname, _prefix, _outside in COMPONENT_FILES:
        src = parts.get(comp)
        if src is None:
            continue
        _check_component(comp, src)
        for name in src.keys():
            key = joined_key(comp, name)
            specs[key] = _out_spec(src.spec(name), dtype)
            plan.append((comp, key, name))
    metadata = dict(parts["transformer"].metadata)
    with SafetensorsWriter(out, specs, metadata, inputs=[s.path for s in parts.values()], force=force) as w:
        done = 0
        total = len(plan)
        stats = stream.StreamStats()
        for comp, src in parts.items():
            items = [stream.Item(w, key, (name,)) for c, key, name in plan if c == comp]

            def progress(i, _n, label, base=done):
                if on_progress:
                    on_progress(base + i, total, label)

            stats = stats.add(stream.run(src, items, on_progress=progress))
            done += len(items)
        w.finalize(metadata)
    files = tuple((c, str(s.path), len(s.keys())) for c, s in parts.items())
    return ComponentsReport(", ".join(str(s.path) for s in parts.values()), str(out), "join", files, dtype, stats)


__all__ = ["ComponentsReport", "component_name", "join_components", "joined_key", "split_components",
           "SINGLE_FILE_PREFIX"]
