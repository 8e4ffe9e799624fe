"""What `loratool inspect` reports about a file, as plain data (no rich, no click).

:func:`inspect_path` opens a file lazily and builds an :class:`Inspection` from the header alone,
plus, for adapters, the alpha scalars (a few bytes each). Hashes read the whole file and are
computed by default for adapters only (``hashes=None``); ``--stats`` and ``--keys`` add work that
reads tensor data. :func:`as_dict` is the stable JSON schema documented in docs/inspect.md.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import dtypes
from .adapters import AdapterIndex, AdapterModule, delta_norm_sq, rank_of, sized_index
from .adapters.families import is_dora, is_tucker
from .arch import ARCH_LABELS, checkpoint_layout, component_of, kohya_modules, standard_config
from .detect import FileDetection, detect_file
from .errors import LoratoolError
from .io.source import TensorSource, TensorSpec, open_file
from .metadata import HashReport, TrainingField, Triggers, hash_report, training_summary, trigger_words
from .progress import Progress

SCHEMA = "loratool.inspect/2"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae", "other")
FAMILY_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full diff"}


@dataclass(frozen=True)
class ModuleInfo:
    """One adapter module as inspect sees it (no tensor data but the alpha scalar)."""

    name: str
    component: str
    family: str  # lora | locon | loha | lokr | full
    layer: str  # linear | conv1x1 | conv3x3 (the layer kind the module wraps)
    rank: int | None
    alpha: float | None
    dora: bool
    tucker: bool
    address: str
    rows: tuple[int, int] | None


@dataclass(frozen=True)
class AdapterSummary:
    family: str  # headline: "LoRA", "LoCon", "LoHa", "LoRA + LoKr", "LoCon + DoRA" ...
    families: dict[str, int]  # per-module family label → modules
    modules: int
    by_component: dict[str, int]
    layers: dict[str, int]  # linear / conv1x1 / conv3x3 → modules
    rank_alpha: tuple[tuple[int | None, float | None, int], ...]  # (rank, alpha, modules), sorted
    dora: int
    tucker: int
    unmapped: tuple[str, ...]
    shape_config: dict[str, int]  # the config dimensions the factors determine (the rest stay standard)
    standard_shapes: bool  # every one of them has the released model's value
    control: dict | None = None  # BFL control LoRA: {"bias_modules", "replaced", "img_in_width"}; None otherwise


@dataclass(frozen=True)
class BlockNorm:
    """Frobenius norm of the effective ΔW (alpha applied) over one block: sqrt(Σ_modules ‖scale·ΔW‖²)."""

    block: str
    modules: int
    norm: float


@dataclass(frozen=True)
class NonFinite:
    key: str
    nan: int
    inf: int


@dataclass(frozen=True)
class Stats:
    blocks: tuple[BlockNorm, ...]
    nonfinite: tuple[NonFinite, ...]
    tensors_checked: int


@dataclass(frozen=True)
class KeyInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str
    maps_to: str  # an address (``key[rows a:b]`` for fused slices), or "unmapped"


@dataclass(frozen=True)
class Inspection:
    """Everything ``loratool inspect`` reports about one file; :func:`as_dict` is its JSON form.

    ``keys``, ``stats`` and ``hashes`` are None unless asked for (hashes: adapters by default);
    ``modules`` is filled for adapters.
    """

    path: str
    format: str
    file_size: int
    detection: FileDetection
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    components: dict[str, int]  # checkpoint: keys per component; adapter: modules per component
    adapter: AdapterSummary | None
    training: tuple[TrainingField, ...]
    triggers: Triggers
    modelspec: dict[str, str]
    hashes: HashReport | None
    hash_note: str
    warnings: tuple[str, ...]
    keys: tuple[KeyInfo, ...] | None = None
    stats: Stats | None = None
    modules: tuple[ModuleInfo, ...] = field(default=(), repr=False)


# ----------------------------------------------------------------------------- building


def inspect_path(
    path: str | os.PathLike,
    arch: str | None = None,
    hashes: bool | None = None,
    keys: bool = False,
    stats: bool = False,
    on_progress: Progress | None = None,
) -> Inspection:
    """Inspect one file or diffusers folder.

    Args:
        path: a model file or diffusers folder.
        arch: force ``sd1`` / ``sd2`` / ``sdxl`` instead of detecting it.
        hashes: True / False, or None for the default: adapters yes, checkpoints and others no.
        keys: list every key with shape, dtype and where it maps.
        stats: read every tensor: NaN/Inf check, and per-block ΔW norms for adapters.
        on_progress: ``(done, total, key)`` after each tensor read by ``stats`` (:mod:`loratool.progress`).

    Raises:
        FormatError: not a readable model file. DetectionError: ambiguous architecture.
    """
    source = open_file(path)
    try:
        return inspect_source(source, arch=arch, hashes=hashes, keys=keys, stats=stats, on_progress=on_progress)
    finally:
        source.close()


def inspect_source(
    source: TensorSource,
    arch: str | None = None,
    hashes: bool | None = None,
    keys: bool = False,
    stats: bool = False,
    on_progress: Progress | None = None,
) -> Inspection:
    """:func:`inspect_path` on an already open source (any :class:`~loratool.io.source.TensorSource`)."""
    specs = {k: source.spec(k) for k in source.keys()}
    metadata = dict(source.metadata or {})
    det = detect_file(specs, metadata, arch)
    warnings: list[str] = []
    index: AdapterIndex | None = det.adapter_index  # type: ignore[assignment]
    modules: tuple[ModuleInfo, ...] = ()
    adapter = None
    if det.kind == "adapter" and index is not None:
        modules = _module_infos(source, specs, index)
        adapter = _adapter_summary(modules, index, specs)
        components = dict(adapter.by_component)
        if index.unmapped:
            where = det.arch or "SD1/SD2/SDXL"
            warnings.append(f"{len(index.unmapped)} keys map to no {where} module (listed under 'unmapped')")
    else:
        components = _checkpoint_components(specs, det.arch)
    path = Path(source.path)
    file_size = _size(path)
    do_hash = (det.kind == "adapter") if hashes is None else hashes
    report, note = None, ""
    if do_hash and path.is_file():
        loader = (lambda: {k: source.get(k) for k in specs}) if det.kind == "adapter" else None
        report = hash_report(path, metadata, is_safetensors=source.format == "safetensors", load_tensors=loader)
        note = "computed"
        if report.model_match is False:
            warnings.append("stored sshs_model_hash does not match the tensor data (file edited after training?)")
        if report.legacy_match is False:
            warnings.append("stored sshs_legacy_hash does not match the recomputed one")
    elif do_hash:
        note = "not computed: not a single file (a diffusers folder has no file hash)"
    elif hashes is False:
        note = "not computed (--no-hash)"
    else:
        note = "not computed (default for checkpoints and other files: pass --hash; it reads the whole file)"
    key_list = _key_infos(specs, det, index) if keys else None
    st = _stats(source, specs, det, index, on_progress) if stats else None
    if st is not None:
        for nf in st.nonfinite:
            warnings.append(f"{nf.key}: {nf.nan} NaN and {nf.inf} Inf values")
    counts = Counter(s.dtype for s in specs.values())
    return Inspection(
        path=str(path),
        format=source.format,
        file_size=file_size,
        detection=det,
        tensors=len(specs),
        parameters=sum(s.numel for s in specs.values()),
        dtypes=dict(sorted(counts.items())),
        components=components,
        adapter=adapter,
        training=training_summary(metadata),
        triggers=trigger_words(metadata),
        modelspec={k: v for k, v in sorted(metadata.items()) if k.startswith("modelspec.")},
        hashes=report,
        hash_note=note,
        warnings=tuple(warnings),
        keys=key_list,
        stats=st,
        modules=modules,
    )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def component_of_key(key: str, arch: str | None = None) -> str:
    """Component of a checkpoint key: ``unet`` / ``transformer``, ``text_encoder``, ``text_encoder_2``, ``vae`` or ``other``."""
    comp = component_of(arch or "sd1", key)[0]
    if comp == "other" and key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
        return "vae"
    return comp


def _checkpoint_components(specs: Mapping[str, TensorSpec], arch: str | None) -> dict[str, int]:
    counts = Counter(component_of_key(k, arch) for k in specs)
    return {c: counts[c] for c in COMPONENTS if counts.get(c)}


def module_family(family: str, layer: str, roles) -> str:
    """Per-module family label: LoRA on a 3x3 conv, or with a Tucker ``mid``, is LoCon."""
    if family == "lora" and ("mid" in roles or layer == "conv3x3"):
        return "locon"
    return family


def _module_infos(source: TensorSource, specs: Mapping[str, TensorSpec], index: AdapterIndex) -> tuple[ModuleInfo, ...]:
    out = []
    for name, roles in sorted(index.modules.items()):
        target = index.targets[name]
        fam = index.families[name]
        by_role = {r: specs[k] for r, k in roles.items()}
        try:
            rank = rank_of(fam, by_role)
        except (KeyError, IndexError):
            rank = None
        alpha = None
        if "alpha" in roles:
            a = source.get(roles["alpha"])
            alpha = float(a.float().reshape(-1)[0]) if a.numel() else None
        out.append(
            ModuleInfo(
                name=name,
                component=target.component,
                family=module_family(fam, target.kind, roles),
                layer=target.kind,
                rank=rank,
                alpha=alpha,
                dora=is_dora(roles),
                tucker=is_tucker(roles),
                address=target.address,
                rows=target.rows,
            )
        )
    return tuple(out)


def family_headline(counts: Mapping[str, int], dora: bool) -> str:
    """One name for the file: LoRA modules next to LoCon ones make a LoCon (kohya's LoRA + conv_dim)."""
    fams = set(counts)
    if fams == {"lora", "locon"}:
        fams = {"locon"}
    names = [FAMILY_LABELS[f] for f in sorted(fams, key=lambda f: (-counts.get(f, 0), f))]
    text = " + ".join(names) if names else "none"
    return text + " + DoRA" if dora else text


def _adapter_summary(modules: tuple[ModuleInfo, ...], index: AdapterIndex, specs) -> AdapterSummary:
    fams = Counter(m.family for m in modules)
    dora = sum(m.dora for m in modules)
    ra = Counter((m.rank, m.alpha) for m in modules)
    comps = Counter(m.component for m in modules)
    index = sized_index(index, specs)
    config = index.solution.config.as_dict() if index.modules else {}
    observed = {k: v for k, v in config.items() if k in index.solution.observed} if index.modules else {}
    standard = standard_config(index.arch).as_dict()
    return AdapterSummary(
        family=family_headline(fams, dora > 0),
        families=dict(sorted(fams.items())),
        modules=len(modules),
        by_component={c: comps[c] for c in COMPONENTS if comps.get(c)},
        layers=dict(sorted(Counter(m.layer for m in modules).items())),
        rank_alpha=tuple(
            sorted(((r, a, n) for (r, a), n in ra.items()), key=lambda t: (t[0] is None, t[0] or 0, t[1] is None, t[1] or 0))
        ),
        dora=dora,
        tucker=sum(m.tucker for m in modules),
        unmapped=tuple(index.unmapped),
        shape_config=observed,
        standard_shapes=all(v == standard[k] for k, v in observed.items()),
        control=_control(index, specs),
    )


def _control(index: AdapterIndex, specs) -> dict | None:
    """What makes a file a BFL control LoRA: LoRA biases, tensors given in full, a widened img_in."""
    bias = sum("up_bias" in roles for roles in index.modules.values())
    if not bias and not index.replaced:
        return None
    width = None
    for name, roles in index.modules.items():
        if index.targets[name].address == "img_in.weight" and "down" in roles:
            width = int(specs[roles["down"]].shape[1])
    return {"bias_modules": bias, "replaced": len(index.replaced), "img_in_width": width}


# ----------------------------------------------------------------------------- --keys


def _address(target) -> str:
    return target.address + (f"[rows {target.rows[0]}:{target.rows[1]}]" if target.rows else "")


def _key_infos(specs: Mapping[str, TensorSpec], det: FileDetection, index: AdapterIndex | None) -> tuple[KeyInfo, ...]:
    where: dict[str, str] = {}
    if index is not None:
        for name, roles in index.modules.items():
            for k in roles.values():
                where[k] = _address(index.targets[name])
    elif det.kind == "checkpoint" and det.arch:
        layout = checkpoint_layout(det.arch, det.naming or "ldm")
        if det.naming == "diffusers":
            by_dkey = {t.diffusers_key: t for t in kohya_modules(det.arch).values()}
            for k in specs:
                if k in by_dkey:
                    where[k] = _address(by_dkey[k])
                elif k in layout:
                    where[k] = k
        else:
            where = {k: k for k in specs if k in layout}
    return tuple(KeyInfo(k, tuple(s.shape), s.dtype, where.get(k, "unmapped")) for k, s in sorted(specs.items()))


# ----------------------------------------------------------------------------- --stats

_BLOCK = re.compile(r"\b(input_blocks|output_blocks|layers|resblocks|down_blocks|up_blocks)\.(\d+)")


def block_of(component: str, address: str) -> str:
    """A module's block: ``unet.input_blocks.4``, ``unet.middle_block``, ``text_encoder.layers.11`` ..."""
    m = _BLOCK.search(address)
    if m:
        name = "layers" if m.group(1) == "resblocks" else m.group(1)
        return f"{component}.{name}.{m.group(2)}"
    rest = address.split("diffusion_model.", 1)[-1] if "diffusion_model." in address else address
    if component == "transformer":  # FLUX: double_blocks.N, single_blocks.N, or the embedders / final layer
        parts = rest.split(".")
        return f"transformer.{parts[0]}.{parts[1]}" if parts[0].endswith("_blocks") else f"transformer.{parts[0]}"
    if "middle_block" in rest:
        return f"{component}.middle_block"
    return f"{component}.{rest.split('.', 1)[0]}" if component == "unet" else f"{component}.other"


def _stats(source: TensorSource, specs, det: FileDetection, index: AdapterIndex | None, on_progress: Progress | None) -> Stats:
    import torch
    nonfinite = []
    for done, (k, s) in enumerate(specs.items(), 1):
        if s.dtype in dtypes.FLOAT_NAMES:
            t = source.get(k)
            if not dtypes.all_finite(t):
                t = t.float()
                nonfinite.append(NonFinite(k, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
        if on_progress is not None:
            on_progress(done, len(specs), k)
    blocks: list[BlockNorm] = []
    if det.kind == "adapter" and index is not None and index.modules:
        index = sized_index(index, specs)
        sq: dict[str, float] = {}
        count: Counter = Counter()
        for name, roles in index.modules.items():
            target = index.targets[name]
            module = AdapterModule(target, index.families[name], {r: source.get(k) for r, k in roles.items()}, dict(roles))
            try:
                norm_sq = delta_norm_sq(module, target.target_shape)
            except (LoratoolError, RuntimeError, KeyError):  # a misfit module: detection reports it, stats skip it
                continue
            b = block_of(target.component, target.address)
            sq[b] = sq.get(b, 0.0) + norm_sq
            count[b] += 1
        ordered = sorted(sq.items(), key=lambda kv: _block_order(kv[0]))
        blocks = [BlockNorm(b, count[b], round(math.sqrt(v), 6)) for b, v in ordered]
    return Stats(tuple(blocks), tuple(nonfinite), len(specs))


def _block_order(block: str):
    comp, _, rest = block.partition(".")
    order = {"text_encoder": 0, "text_encoder_2": 1, "unet": 2}.get(comp, 3)
    unet = {"input_blocks": 0, "down_blocks": 0, "middle_block": 1, "mid_block": 1, "output_blocks": 2, "up_blocks": 2}
    parts = rest.split(".")
    num = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    return (order, unet.get(parts[0], 3), num, rest)


# ----------------------------------------------------------------------------- JSON


def as_dict(report: Inspection) -> dict:
    """The stable JSON form (schema ``loratool.inspect/2``; every top-level key always present)."""
    det = report.detection
    adapter = None
    if report.adapter is not None:
        a = report.adapter
        adapter = {
            "family": a.family,
            "families": a.families,
            "modules": a.modules,
            "by_component": a.by_component,
            "layers": a.layers,
            "rank_alpha": [{"rank": r, "alpha": al, "modules": n} for r, al, n in a.rank_alpha],
            "dora_modules": a.dora,
            "tucker_modules": a.tucker,
            "unmapped": list(a.unmapped),
            "shape_config": a.shape_config,
            "standard_shapes": a.standard_shapes,
            "control": a.control,
        }
    t = report.triggers
    return {
        "schema": SCHEMA,
        "path": report.path,
        "format": report.format,
        "file_size": report.file_size,
        "kind": det.kind,
        "detection": {
            "arch": det.arch,
            "arch_label": ARCH_LABELS.get(det.arch or "", None),
            "naming": det.naming,
            "confidence": det.confidence,
            "runner_up": asdict(det.runner_up) if det.runner_up else None,
            "forced": det.forced,
            "description": det.description,
            "other": det.other,
            "evidence": list(det.evidence),
        },
        "tensors": {"count": report.tensors, "parameters": report.parameters, "dtypes": report.dtypes},
        "components": report.components,
        "adapter": adapter,
        "training": {f.name: f.value for f in report.training},
        "triggers": {
            "words": list(t.words),
            "trigger_phrase": t.trigger_phrase,
            "images": t.images,
            "tags": [asdict(x) for x in t.tags],
            "folders": [asdict(f) for f in t.folders],
        },
        "modelspec": report.modelspec,
        "hashes": asdict(report.hashes) if report.hashes else None,
        "hash_note": report.hash_note,
        "warnings": list(report.warnings),
        "keys": [{"key": k.key, "shape": list(k.shape), "dtype": k.dtype, "maps_to": k.maps_to} for k in report.keys]
        if report.keys is not None
        else None,
        "modules": [
            {
                "name": m.name,
                "component": m.component,
                "family": m.family,
                "layer": m.layer,
                "rank": m.rank,
                "alpha": m.alpha,
                "dora": m.dora,
                "tucker": m.tucker,
                "address": m.address,
                "rows": list(m.rows) if m.rows else None,
            }
            for m in report.modules
        ]
        if report.keys is not None and report.adapter is not None
        else None,
        "stats": {
            "blocks": [asdict(b) for b in report.stats.blocks],
            "nonfinite": [asdict(n) for n in report.stats.nonfinite],
            "tensors_checked": report.stats.tensors_checked,
        }
        if report.stats is not None
        else None,
    }
