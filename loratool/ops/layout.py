"""Full-checkpoint conversion: single file (LDM/SGM keys) ↔ diffusers folder, streamed tensor by tensor.

The plan comes from :func:`loratool.arch.sd_checkpoint.checkpoint_links`: every output tensor
names its input(s) and transform before anything is read, every source key is either used,
dropped for a documented reason (one-sided keys such as schedule buffers), or reported as
unknown (a :class:`MappingError` unless ``allow_unmapped``). Values are never changed except by
the link's transform (row slice / concatenation, 1x1-conv ↔ linear reshape, transpose) and the
optional dtype cast, so ``ldm → diffusers → ldm`` gives back the same bytes for every key that
exists on both sides.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from ..adapters.math import swap_row_halves
from ..arch.sd_checkpoint import KeyLink, checkpoint_links, linked_shape, one_sided_reason, sized_link, solve_config
from ..arch.sd_pipeline import default_prediction_type, write_pipeline_files
from ..detect import detect_checkpoint
from ..errors import LoratoolError, MappingError, OutputError, listing
from ..io import stream
from ..io.folder import FolderOutput, weight_file
from ..io.source import TensorSource, TensorSpec, open_file
from ..io.writer import SafetensorsWriter
from ..progress import Progress

_COMPONENT_ORDER = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")



@dataclass(frozen=True)
class CheckpointConvertReport:
    """What a conversion did.

    Attributes:
        source, out: paths as given.
        arch: ``sd1`` | ``sd2`` | ``sdxl``.
        source_naming, to: ``ldm`` or ``diffusers``.
        dtype: output float dtype (safetensors name) or None when kept.
        written: number of tensors written.
        bytes_written: size of the tensor data written.
        dropped: (source key, reason) of one-sided keys that have no place in the output.
        missing: output keys not written because the source lacks their input (e.g. a UNet-only file).
        unmapped: unknown source keys left out (only with ``allow_unmapped``).
        omitted: (key, reason) of keys the output layout can hold but that are never fabricated
            (e.g. LDM schedule buffers and SD2's ``resblocks.23`` when writing a single file).
        transforms: count of written tensors per transform (``rows``, ``conv1x1_linear``, ``transpose``).
        files: output files written (relative to ``out`` for a folder).
    """

    source: str
    out: str
    arch: str
    source_naming: str
    to: str
    dtype: str | None
    written: int
    bytes_written: int
    dropped: tuple[tuple[str, str], ...]
    missing: tuple[str, ...]
    unmapped: tuple[str, ...]
    omitted: tuple[tuple[str, str], ...] = ()
    transforms: dict[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    stream: stream.StreamStats | None = None

    def as_dict(self) -> dict:
        """Plain JSON-ready dict (lists of ``{"key", "reason"}`` for dropped/omitted keys)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for name in ("dropped", "omitted"):
            out[name] = [{"key": k, "reason": why} for k, why in getattr(self, name)]
        for name in ("missing", "unmapped", "files"):
            out[name] = list(getattr(self, name))
        out["stream"] = stream.stream_json(self.stream)
        return out


@dataclass(frozen=True)
class _Item:
    """One output tensor: its key, spec and the links that produce it (several for a fused tensor)."""

    key: str
    spec: TensorSpec
    links: tuple[KeyLink, ...]


def convert_checkpoint(
    source: str | os.PathLike | TensorSource,
    out: Path,
    to: str,
    arch: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    on_progress: Progress | None = None,
    allow_unmapped: bool = False,
    prediction_type: str | None = None,
) -> CheckpointConvertReport:
    """Convert a full SD1/SD2/SDXL checkpoint between single-file and diffusers-folder layouts.

    Args:
        source: a path (file or diffusers folder) or an open lazy source (``open_file``).
        out: ``.safetensors`` file for ``to="ldm"``; folder for ``to="diffusers"``.
        to: ``ldm`` (single file with LDM/SGM keys) or ``diffusers`` (pipeline folder).
        arch: force ``sd1``/``sd2``/``sdxl`` instead of detecting it.
        dtype: cast float tensors (``fp16``, ``bf16``, ``F32`` ...); integers are kept.
        force: replace an existing output (never an input).
        on_progress: called as ``on_progress(done, total, key)`` after each tensor.
        allow_unmapped: leave unknown source keys out (listed in the report) instead of raising.
        prediction_type: the diffusers scheduler's ``epsilon`` / ``v_prediction`` (default: see
            :func:`loratool.arch.sd_pipeline.default_prediction_type`).

    Returns:
        A :class:`CheckpointConvertReport`.

    Raises:
        MappingError: unknown source keys (without ``allow_unmapped``), or a fused q/k/v group
            that is only partly present.
        DetectionError: the keys fit no known layout.
        OutputError: the output exists (without ``force``) or is the input.

    Example:
        >>> convert_checkpoint("fixtures/sd15-tiny.safetensors", Path("/tmp/sd15-folder"), "diffusers")  # doctest: +SKIP
    """
    if to not in ("ldm", "diffusers"):
        raise LoratoolError(f"unknown target layout {to!r}", hint="use ldm (single file) or diffusers (folder)")
    out_dtype = dtypes.parse_cli(dtype) if dtype else None
    own = not hasattr(source, "keys")
    src = open_file(source) if own else source
    try:
        specs = {k: src.spec(k) for k in src.keys()}
        match = detect_checkpoint(specs, arch)
        if match.naming == to == "ldm":
            raise LoratoolError(
                f"{src.path} is already a single-file checkpoint",
                hint="use --to diffusers, or re-save it without --to to change container or dtype",
            )
        plan, dropped, missing, unmapped = _plan(match.arch, specs, match.naming, to, out_dtype)
        if unmapped and not allow_unmapped:
            raise MappingError(
                f"{src.path}: {len(unmapped)} keys are not part of an {match.arch} checkpoint: {listing(unmapped)}",
                hint="check --arch; pass --allow-unmapped to leave them out (they are listed in the report)",
            )
        if not plan:
            raise MappingError(f"{src.path}: nothing to convert", hint="is this a full SD checkpoint?")
        inputs = [src.path]
        if to == "ldm":
            files, nbytes, stats = _write_single(src, Path(out), plan, inputs, force, on_progress)
        else:
            files, nbytes, stats = _write_folder(src, Path(out), plan, match.arch, inputs, force, on_progress,
                                                 prediction_type)
    finally:
        if own:
            src.close()
    transforms: dict[str, int] = {}
    for item in plan:
        for t in {("rows" if lk.rows else lk.transform) for lk in item.links} - {None}:
            transforms[t] = transforms.get(t, 0) + 1
    return CheckpointConvertReport(
        source=str(src.path),
        out=str(out),
        arch=match.arch,
        source_naming=match.naming,
        to=to,
        dtype=out_dtype,
        written=len(plan),
        bytes_written=nbytes,
        dropped=tuple(dropped),
        missing=tuple(missing),
        unmapped=tuple(unmapped),
        omitted=tuple(sorted(_one_sided_table(match.arch, to).items())),
        transforms=dict(sorted(transforms.items())),
        files=tuple(files),
        stream=stats,
    )


# ----------------------------------------------------------------------------- planning


def _one_sided_table(arch: str, naming: str) -> dict[str, str]:
    links = checkpoint_links(arch)
    return links.ldm_only if naming == "ldm" else links.diffusers_only


def _cast(spec: TensorSpec, out_dtype: str | None) -> str:
    return out_dtype if out_dtype and spec.dtype in dtypes.FLOAT_NAMES else spec.dtype


def _plan(
    arch: str, specs: dict[str, TensorSpec], source_naming: str, to: str, out_dtype: str | None
) -> tuple[list[_Item], list[tuple[str, str]], list[str], list[str]]:
    """Output items (diffusers → diffusers is a plain copy: items without links), plus the
    dropped / missing / unmapped keys."""
    links = checkpoint_links(arch)
    used = set(links.by_diffusers) if source_naming == "diffusers" else set(links.by_ldm)
    dropped: list[tuple[str, str]] = []
    unmapped: list[str] = []
    for key in specs:
        if key in used:
            continue
        why = one_sided_reason(arch, key, source_naming)
        if why is None:
            unmapped.append(key)
        else:
            dropped.append((key, why))
    plan: list[_Item] = []
    missing: list[str] = []
    if source_naming == to:
        for key in links.by_diffusers:
            if key in specs:
                plan.append(_Item(key, TensorSpec(specs[key].shape, _cast(specs[key], out_dtype)), ()))
            else:
                missing.append(key)
        return plan, dropped, missing, unmapped
    if to == "diffusers":
        config = solve_config(arch, specs, "ldm")
        for lk in links.links:
            spec = specs.get(lk.ldm_key)
            if spec is None:
                missing.append(lk.diffusers_key)
                continue
            lk = sized_link(lk, config)
            shape = linked_shape(lk, spec.shape)
            plan.append(_Item(lk.diffusers_key, TensorSpec(shape, _cast(spec, out_dtype)), (lk,)))
        plan.sort(key=lambda it: (_COMPONENT_ORDER.index(it.key.split("/", 1)[0]), it.key))
        return plan, dropped, missing, unmapped
    for ldm_key, group in links.by_ldm.items():
        present = [lk for lk in group if lk.diffusers_key in specs]
        if not present:
            missing.append(ldm_key)
            continue
        if len(present) < len(group):
            lacking = [lk.diffusers_key for lk in group if lk.diffusers_key not in specs]
            raise MappingError(
                f"{ldm_key} is fused from {len(group)} tensors but the source lacks {listing(lacking)}",
                hint="the diffusers folder is incomplete; q, k and v projections must all be present",
            )
        first = specs[group[0].diffusers_key]
        if group[0].rows is not None:
            shape = (sum(specs[lk.diffusers_key].shape[0] for lk in group), *first.shape[1:])
        elif group[0].transform == "conv1x1_linear":
            shape = (*first.shape, 1, 1)
        elif group[0].transform == "transpose":
            shape = tuple(reversed(first.shape))
        else:
            shape = first.shape
        plan.append(_Item(ldm_key, TensorSpec(tuple(shape), _cast(first, out_dtype)), group))
    return plan, dropped, missing, unmapped


# ----------------------------------------------------------------------------- tensors


def _to_diffusers(lk: KeyLink):
    """The function making the diffusers tensor of ``lk`` (sized to the file) from its single-file tensor
    (None: the tensor as is): ``W[rows]``, ``W[:, :, 0, 0]`` (1x1 conv → linear) or ``W.T``."""
    if lk.rows is not None:
        return lambda w: w[slice(*lk.rows)]
    if lk.transform == "conv1x1_linear":
        return lambda w: w.reshape(w.shape[0], w.shape[1])
    if lk.transform == "transpose":
        return lambda w: w.t()
    if lk.transform == "swap_halves":
        return swap_row_halves
    return None


def _to_ldm(group: tuple[KeyLink, ...]):
    """The function making a single-file tensor from its link group's inputs (None: the one input as is):
    ``cat([q, k, v])``, ``W[:, :, None, None]`` or ``W.T``."""
    if group[0].rows is not None:
        return lambda *parts: torch.cat(parts, dim=0)
    if group[0].transform == "conv1x1_linear":
        return lambda w: w.reshape(*w.shape, 1, 1)
    if group[0].transform == "transpose":
        return lambda w: w.t()
    if group[0].transform == "swap_halves":
        return swap_row_halves
    return None


def _inputs(group: tuple[KeyLink, ...]) -> tuple[str, ...]:
    return tuple(lk.diffusers_key for lk in group) if group[0].rows is not None else (group[0].diffusers_key,)


# the single file's own metadata, kept in every weight file of the folder made from it, so that converting the
# folder back gives the same file byte for byte (diffusers reads only "format")
SINGLE_FILE_METADATA = "loratool.single_file_metadata"


def _write_single(
    src, out: Path, plan: list[_Item], inputs, force: bool, on_progress: Progress | None,
) -> tuple[list[str], int, stream.StreamStats]:
    for inp in inputs:
        if Path(inp).is_dir() and Path(inp).resolve() in out.resolve().parents:
            raise OutputError(f"output {out} is inside the input folder {inp}", hint="write it outside the diffusers folder")
    specs = {it.key: it.spec for it in plan}
    recorded = src.metadata.get(SINGLE_FILE_METADATA)
    metadata = json.loads(recorded) if recorded is not None else {"format": "pt"}  # the original file's, if we wrote it
    with SafetensorsWriter(out, specs, metadata, inputs=inputs, force=force) as w:
        items = [stream.Item(w, it.key, _inputs(it.links), _to_ldm(it.links)) for it in plan]
        stats = stream.run(src, items, on_progress=on_progress)
        w.finalize()
    return [out.name], sum(s.nbytes for s in specs.values()), stats


def _write_folder(
    src, out: Path, plan: list[_Item], arch: str, inputs, force: bool, on_progress: Progress | None,
    prediction_type: str | None = None,
) -> tuple[list[str], int, stream.StreamStats]:
    with FolderOutput(out, inputs, force) as folder:
        files, stats = _fill_folder(src, folder.tmp, plan, arch, on_progress, prediction_type)
    return files, sum(it.spec.nbytes for it in plan), stats


def _fill_folder(src, root: Path, plan: list[_Item], arch: str, on_progress: Progress | None,
                 prediction_type: str | None = None) -> tuple[list[str], stream.StreamStats]:
    by_comp: dict[str, list[_Item]] = {}
    for it in plan:
        by_comp.setdefault(it.key.split("/", 1)[0], []).append(it)
    files: list[str] = []
    specs_by_comp: dict[str, dict[str, TensorSpec]] = {}
    with ExitStack() as stack:
        items = []
        for comp, comp_items in by_comp.items():
            (root / comp).mkdir()
            specs = {it.key.split("/", 1)[1]: it.spec for it in comp_items}
            specs_by_comp[comp] = specs
            path = root / comp / weight_file(comp)
            meta = {"format": "pt", SINGLE_FILE_METADATA: json.dumps(dict(src.metadata), sort_keys=True)}
            w = stack.enter_context(SafetensorsWriter(path, specs, meta))
            for it in comp_items:
                name = it.key.split("/", 1)[1]
                if it.links:
                    items.append(stream.Item(w, name, (it.links[0].ldm_key,), _to_diffusers(it.links[0])))
                else:
                    items.append(stream.Item(w, name, (it.key,)))
            files.append(f"{comp}/{path.name}")
        stats = stream.run(src, items, on_progress=on_progress)
        for w in {id(i.writer): i.writer for i in items}.values():
            w.finalize()
    keys = set(src.keys())
    if arch == "flux1":
        return files + _write_flux_config(root, src, specs_by_comp), stats
    betas = src.get("betas") if "betas" in keys else None
    prediction = prediction_type or default_prediction_type(arch, keys)
    files += write_pipeline_files(root, arch, specs_by_comp, betas, prediction)
    return files, stats


def _write_flux_config(root: Path, src, specs_by_comp: dict[str, dict[str, TensorSpec]]) -> list[str]:
    """``transformer/config.json`` from the weights' shape config (the folder loads with
    ``FluxTransformer2DModel.from_pretrained(OUT, subfolder="transformer")``), and a ``model_index.json``
    naming only the transformer (``FluxPipeline.from_pretrained(OUT, vae=..., text_encoder=..., ...)``
    takes the other components from their own files)."""
    import json

    from ..arch.flux_naming import flux_transformer_config

    specs = {f"transformer/{k}": s for k, s in specs_by_comp.get("transformer", {}).items()}
    config = solve_config("flux1", specs, "diffusers")
    guidance = "transformer/time_text_embed.guidance_embedder.linear_1.weight" in specs
    cfg = flux_transformer_config(config, guidance)
    (root / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    index.update({c: [None, None] for c in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")})
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return ["transformer/config.json", "model_index.json"]


__all__ = ["CheckpointConvertReport", "convert_checkpoint"]
