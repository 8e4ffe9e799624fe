"""`loratool convert`: containers, dtypes, pruning, LoRA naming and LyCORIS → LoRA.

:func:`convert` plans the output (keys, shapes, dtypes), streams tensors from the source to the
writer (:mod:`loratool.io.stream`, :func:`loratool.io.output.open_writer`) and returns a
:class:`ConvertReport`; it never prints. The LyCORIS → LoRA factor math is
:func:`loratool.adapters.to_lora_factors`.

Casts follow the one rule of :func:`loratool.dtypes.cast` (clamp to the finite range, round to nearest
even), applied by the engine and counted by the writer.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import dtypes
from ..adapters import DEFAULT_REL_TOL, FAMILIES, AdapterModule, rank_of, to_lora_factors
from ..adapters.families import missing_roles
from ..adapters.io import fuse_parts, is_alpha_key, module_tensors, replaced_key, split_fused
from ..adapters.math import bias_delta
from ..arch.sd import EMA_PREFIX
from ..arch.sd_checkpoint import SCHEDULE_BUFFERS
from ..errors import LoratoolError, MappingError, OutputError, listing
from ..io import stream
from ..io.output import open_writer
from ..io.source import TensorSource, TensorSpec
from ..io.writer import check_output, container_for
from ..metadata.kohya import network_fields
from ..progress import Progress

# ----------------------------------------------------------------------------- dtype casts

# Keys whose dtype a cast leaves alone: the LDM DDPM schedule buffers and the EMA decay are
# float32 in every release (kohya's merge carries them over unchanged); 1000 values, 48 KB.
KEEP_DTYPE_KEYS = frozenset(SCHEDULE_BUFFERS) | {EMA_PREFIX + "decay"}


def alpha_in_dtype(alpha: torch.Tensor, dtype: str) -> torch.Tensor:
    """A LoRA ``alpha`` in ``dtype`` if that keeps its value exactly, else float32 (see
    :func:`loratool.dtypes.exact_scalar`). Integer alphas (``svd_merge_lora.py`` writes int64) are kept.
    """
    if not alpha.is_floating_point():
        return alpha
    return dtypes.exact_scalar(float(alpha.double().reshape(-1)[0]), dtype)


# ----------------------------------------------------------------------------- prune rules

# What --prune drops from a full checkpoint, and why. Anything else is kept.
PRUNE_RULES: tuple[tuple[str, str], ...] = (
    (EMA_PREFIX, "EMA shadow weights and their counters (model_ema.decay, model_ema.num_updates)"),
    ("first_stage_model.loss.", "VAE training loss: LPIPS and discriminator weights"),
    ("loss.", "training loss weights"),
    ("optimizer.", "optimizer state"),
    ("optimizer_states.", "optimizer state"),
    ("lr_scheduler", "learning-rate scheduler state"),
)


def prune_reason(key: str) -> str | None:
    """Why ``--prune`` drops ``key`` (None: kept)."""
    for prefix, reason in PRUNE_RULES:
        if key.startswith(prefix):
            return reason
    return None


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ModuleResult:
    """One adapter module in a naming / family conversion."""

    name: str
    family: str
    rank_in: int | None
    rank_out: int
    rel_error: float
    how: str = "kept"  # kept | folded mid | svd


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` did; the CLI renders it (``--json`` dumps :meth:`to_dict`)."""

    input: str
    output: str
    kind: str  # checkpoint | adapter | tensors
    container_in: str
    container_out: str
    tensors_in: int
    tensors_out: int
    bytes_out: int
    dtype: str | None = None
    arch: str | None = None
    naming_in: str | None = None
    naming_out: str | None = None
    families_in: tuple[str, ...] = ()
    pruned: tuple[tuple[str, str], ...] = ()  # (key, reason)
    clamped: tuple[tuple[str, int], ...] = ()  # (key, elements clamped)
    kept_dtype: tuple[str, ...] = ()
    modules: tuple[ModuleResult, ...] = ()
    max_rel_error: float = 0.0
    notes: tuple[str, ...] = ()
    stream: stream.StreamStats | None = None  # the streaming engine's budget and peaks (streamed copies only)

    def to_dict(self) -> dict:
        pruned: dict[str, list[str]] = {}
        for key, reason in self.pruned:
            pruned.setdefault(reason, []).append(key)
        return {
            "input": self.input,
            "output": self.output,
            "kind": self.kind,
            "container_in": self.container_in,
            "container_out": self.container_out,
            "tensors_in": self.tensors_in,
            "tensors_out": self.tensors_out,
            "bytes_out": self.bytes_out,
            "dtype": self.dtype,
            "arch": self.arch,
            "naming_in": self.naming_in,
            "naming_out": self.naming_out,
            "families_in": list(self.families_in),
            "pruned": {
                "count": len(self.pruned),
                "by_reason": {r: {"count": len(k), "examples": k[:3]} for r, k in pruned.items()},
            },
            "clamped": {"tensors": len(self.clamped), "elements": sum(n for _, n in self.clamped),
                        "examples": [f"{k} ({n})" for k, n in self.clamped[:3]]},
            "kept_dtype": list(self.kept_dtype),
            "modules": len(self.modules),
            "modules_refactored": [
                {
                    "name": m.name,
                    "family": m.family,
                    "how": m.how,
                    "rank_in": m.rank_in,
                    "rank_out": m.rank_out,
                    "rel_error": m.rel_error,
                }
                for m in self.modules
                if m.how != "kept"
            ],
            "max_rel_error": self.max_rel_error,
            "notes": list(self.notes),
            "stream": stream.stream_json(self.stream),
        }




# ----------------------------------------------------------------------------- classification


def classify(source: TensorSource) -> str:
    """``adapter`` (most keys carry a LoRA/LyCORIS suffix), ``checkpoint`` (a known SD layout) or ``tensors``."""
    if getattr(source, "format", "") == "diffusers":
        return "checkpoint"
    keys = source.keys()
    if not keys:
        return "tensors"
    from ..detect import MIN_SCORE, is_adapter, score_checkpoint

    if is_adapter(keys):
        return "adapter"

    specs = {k: source.spec(k) for k in keys}
    if score_checkpoint(specs)[0].score >= MIN_SCORE:
        return "checkpoint"
    kept = {k: s for k, s in specs.items() if not prune_reason(k)}
    if kept and len(kept) < len(specs) and score_checkpoint(kept)[0].score >= MIN_SCORE:
        return "checkpoint"  # a training checkpoint full of EMA copies scores low until those are set aside
    return "tensors"


# ----------------------------------------------------------------------------- container / dtype / prune copy


def _copy(
    source: TensorSource,
    out: Path,
    kind: str,
    dtype: str | None,
    prune: bool,
    force: bool,
    on_progress: Progress | None,
    scaled: bool = False,
) -> ConvertReport:
    """Stream every tensor from ``source`` to ``out`` (keys unchanged), casting and pruning as asked.

    ComfyUI scaled fp8 (a ``scaled_fp8`` marker, fp8 weights with a ``scale_weight`` beside each): with another
    ``dtype`` (or ``scaled`` off) the weights are dequantized (``W = stored · scale_weight``) and the scale keys
    and the marker dropped; ``scaled`` with an fp8 ``dtype`` writes that format from any checkpoint (per weight
    ``scale_weight = max|W| / fp8 max``, ``stored = W / scale_weight`` rounded to nearest even)."""
    keys = source.keys()
    pruned = [(k, r) for k in keys if prune and (r := prune_reason(k))]
    scales_in = {k.removesuffix("scale_weight") + "weight": k for k in keys if k.endswith(".scale_weight")}
    scales_in = {w: sk for w, sk in scales_in.items() if w in keys}
    keep_scaled = bool(scales_in) and (dtype is None or (scaled and source.spec(next(iter(scales_in))).dtype == dtype))
    if scales_in and not keep_scaled:  # dequantize: the bookkeeping keys go with the scale
        pruned += [(k, "scaled fp8 bookkeeping (weights dequantized)") for k in keys
                   if k.endswith((".scale_weight", ".scale_input")) or k.rsplit(".", 1)[-1] == "scaled_fp8"]
    dropped = {k for k, _ in pruned}
    kept = [k for k in keys if k not in dropped]
    specs: dict[str, TensorSpec] = {}
    kept_dtype: list[str] = []
    alphas: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for k in kept:
        spec = source.spec(k)
        dt = spec.dtype
        if dtype and dt in dtypes.FLOAT_NAMES and dt != dtype:
            if k in KEEP_DTYPE_KEYS:
                kept_dtype.append(k)
            elif kind == "adapter" and is_alpha_key(k) and spec.numel == 1:
                alphas[k] = alpha_in_dtype(source.get(k), dtype)
                dt = dtypes.name_of(alphas[k].dtype)
                if dt != dtype:
                    notes.append(f"{k} = {float(alphas[k])} is not exact in {dtype}; kept as {dt}")
            else:
                dt = dtype
        specs[k] = TensorSpec(spec.shape, dt)
    container_out = container_for(out)
    metadata = dict(source.metadata)
    extras = getattr(source, "extras", None)
    if extras:
        notes.append(f"dropped {len(extras)} non-tensor entries of the pickle: {listing(sorted(map(str, extras)), 6)}")
    if container_out == "pickle" and metadata:
        notes.append(f"dropped {len(metadata)} metadata entries: a torch pickle has no metadata field")
    if kind == "adapter" and container_out == "safetensors" and "sshs_model_hash" in metadata:
        metadata.pop("sshs_model_hash", None)
        metadata.pop("sshs_legacy_hash", None)
        fresh = True
    else:
        fresh = False
    fns: dict[str, tuple[tuple[str, ...], object]] = {}
    if scales_in and not keep_scaled:
        for w, sk in scales_in.items():
            fns[w] = ((w, sk), lambda t, sc: t.float() * sc.float().reshape(()))
        notes.append(f"dequantized {len(scales_in)} scaled-fp8 weights (W = stored · scale_weight); the scale keys "
                     "and the scaled_fp8 marker are dropped")
    elif scaled and not scales_in:
        marker, new = _scaled_fp8_plan(kind, kept, specs, dtype)
        fmax = dtypes.float_max(dtype)
        computed: dict[str, torch.Tensor] = {}  # weight key → its scale, set when the weight is computed

        def quantized(t: torch.Tensor, key: str) -> torch.Tensor:
            t = t.float()
            computed[key] = (t.abs().max().clamp(min=1e-12) / fmax).reshape(())
            return t / computed[key]

        for w in new:  # the weight first (read once), then its scale from what that computed
            sk = w.removesuffix("weight") + "scale_weight"
            specs[sk] = TensorSpec((), "F32")
            fns[w] = ((w,), lambda t, key=w: quantized(t, key))
            fns[sk] = ((), lambda key=w: computed.pop(key))
        for k in kept:
            if k not in new and specs[k].dtype == dtype and source.spec(k).dtype != dtype:
                specs[k] = TensorSpec(specs[k].shape, source.spec(k).dtype)  # biases, norms: kept as they are
        specs[marker] = TensorSpec((0,), dtype)
        marker_dtype = dtypes.to_torch(dtype)
        fns[marker] = ((), lambda: torch.zeros(0, dtype=marker_dtype))
        notes.append(f"ComfyUI scaled fp8: {len(new)} weights stored as W / scale_weight with a scale_weight each; "
                     "other tensors keep their dtype")
    wrap = kind == "checkpoint"
    writer = open_writer(out, specs, metadata, [source.path], force, wrap)
    with writer:
        # the writer casts (one clamp rule) and counts clamped values; unchanged tensors are copied raw
        items = [stream.Item(writer, k, (k,), (lambda _t, a=alphas[k]: a) if k in alphas else None) for k in kept
                 if k not in fns]
        items += [stream.Item(writer, k, inputs, fn) for k, (inputs, fn) in fns.items()]
        stats = stream.run(source, items, on_progress=on_progress)
        clamped = [(k, n) for k, n in writer.clamped.items()]
        if fresh:
            metadata = _rehash_cast(metadata, source, kept, specs, alphas)
        writer.finalize(metadata if container_out == "safetensors" else None)
    if clamped:
        notes.append(
            f"clamped {sum(n for _, n in clamped)} values in {len(clamped)} tensors to ±{dtypes.float_max(dtype or 'F32'):g}"
        )
    return ConvertReport(
        input=str(source.path),
        output=str(out),
        kind=kind,
        container_in=source.format,
        container_out=container_out,
        tensors_in=len(keys),
        tensors_out=len(kept),
        bytes_out=out.stat().st_size,
        dtype=dtype,
        pruned=tuple(pruned),
        clamped=tuple(clamped),
        kept_dtype=tuple(kept_dtype),
        notes=tuple(notes),
        stream=stats,
    )


def _rehash_cast(metadata, source: TensorSource, kept, specs, alphas) -> dict[str, str]:
    """kohya hashes of the tensors as written (cast to their planned dtypes)."""
    from ..metadata import with_hashes

    tensors = {}
    for k in kept:
        t = alphas[k] if k in alphas else source.get(k)
        if t.is_floating_point():
            t, _ = dtypes.cast(t, specs[k].dtype)
        tensors[k] = t
    return with_hashes(tensors, metadata)


# ----------------------------------------------------------------------------- LoRA naming / family


PEFT_ALPHA_KEY = "loratool.lora_alpha"


def _out_shapes(target, naming: str, down: torch.Tensor, up: torch.Tensor, keep_rank: tuple | None):
    """Reshape factors for the output naming.

    kohya: 4-D factors for conv modules (also its 1x1-conv LoRA on SD2's linear proj weights),
    2-D for linear ones. PEFT / diffusers: the rank of the model weight in diffusers (SD2/SDXL
    proj layers are Linear there, so SD2's 1x1-conv LoRA is squeezed — exact).
    ``keep_rank``: (down shape, up shape) of the input when it already uses this naming: kept.
    """
    k = down.shape[0]
    if keep_rank:
        return down.reshape(keep_rank[0]), up.reshape(keep_rank[1])
    if naming == "kohya":
        four_d = target.kind.startswith("conv")
    else:
        four_d = len(target.shape) == 4
    if four_d:
        if down.dim() == 2:
            return down.reshape(k, -1, 1, 1), up.reshape(up.shape[0], k, 1, 1)
        return down, up.reshape(up.shape[0], k, 1, 1)
    if down.dim() == 4 and math.prod(down.shape[2:]) != 1:
        raise MappingError(f"{target.name}: a {tuple(down.shape[2:])} conv LoRA cannot target a linear weight")
    return down.reshape(k, -1), up.reshape(up.shape[0], k)


def _scaled_fp8_plan(kind: str, keys, specs, dtype: str | None) -> tuple[str, list[str]]:
    """The marker key and the weights that ComfyUI's scaled fp8 stores scaled: the denoiser's 2-D weights."""
    if kind != "checkpoint" or dtype not in ("F8_E4M3", "F8_E5M2"):
        raise LoratoolError("--scaled writes ComfyUI scaled fp8: a full checkpoint with --dtype fp8_e4m3fn or fp8_e5m2",
                            hint="add --dtype fp8_e4m3fn, or leave --scaled out")
    from ..arch.flux import SINGLE_FILE_PREFIX, component_of_key

    prefix = SINGLE_FILE_PREFIX if any(k.startswith(SINGLE_FILE_PREFIX) for k in keys) else ""
    weights = [k for k in keys if k.endswith(".weight") and len(specs[k].shape) == 2
               and component_of_key(k)[0] == "transformer"]
    if not weights:
        raise LoratoolError("--scaled is for FLUX.1 checkpoints (ComfyUI's scaled fp8 layout)", hint="leave --scaled out")
    return prefix + "scaled_fp8", weights


def _convert_adapter(
    source: TensorSource,
    out: Path,
    to: str,
    dtype: str | None,
    arch: str | None,
    force: bool,
    max_rank: int | None,
    max_error: float,
    rel_tol: float,
    on_progress: Progress | None,
) -> ConvertReport:
    from ..adapters import load_adapter

    loaded = load_adapter(source, arch=arch)
    naming_in = loaded.naming
    naming_out = naming_in if to == "lora" else to
    if naming_out not in ("kohya", "peft", "diffusers", "comfyui"):
        naming_out = "kohya"
    if naming_out == "comfyui" and loaded.arch != "flux1":
        raise LoratoolError("--to comfyui names FLUX.1 LoRAs (diffusion_model.<BFL path>.lora_A/lora_B)",
                            hint="for SD LoRAs use --to kohya, which ComfyUI reads")
    keeps_alpha = naming_out in ("kohya", "comfyui")  # namings with an alpha key; PEFT / diffusers fold it
    if not keeps_alpha:
        split_fused(loaded)  # PEFT / diffusers name the q, k, v (and MLP) parts of a fused tensor separately
    recorded = {}
    if keeps_alpha and PEFT_ALPHA_KEY in source.metadata:
        try:
            recorded = {str(k): float(v) for k, v in json.loads(source.metadata[PEFT_ALPHA_KEY]).items()}
        except (TypeError, ValueError):
            recorded = {}
    if keeps_alpha:
        if loaded.is_control:
            raise MappingError(
                f"{source.path} is a control LoRA (LoRA biases, norm scales given in full): {naming_out} names have no keys "
                "for those", hint="convert it with --to peft (diffusers reads that), or merge it into a checkpoint",
            )
        _undo_peft_fold(loaded, recorded, naming_in)
        fuse_parts(loaded)  # kohya names a fused tensor once (FLUX q, k, v, MLP-in parts stacked back)
    elif naming_out == "diffusers" and loaded.is_control:
        naming_out = "peft"  # the legacy diffusers names have no bias keys; diffusers reads PEFT names
    _check_roles(str(source.path), loaded.modules)
    bad = [name for name, m in loaded.modules.items() if "diff_b" in m.tensors]
    if bad:
        raise MappingError(
            f"{source.path}: {len(bad)} modules carry a bias difference (diff_b), which a LoRA cannot hold: {listing(bad, 4)}",
            hint="keep this file in its LyCORIS format",
        )
    dora = [name for name, m in loaded.modules.items() if m.is_dora]
    if dora and not keeps_alpha:
        raise MappingError(
            f"{source.path}: {len(dora)} DoRA modules: {listing(dora, 4)}; PEFT's magnitude vector is per output row, "
            "LyCORIS' DoRA scale per input column, so they do not convert",
            hint="convert DoRA files with --to kohya only",
        )
    tensors: dict[str, torch.Tensor] = {}
    results: list[ModuleResult] = []
    too_far: list[str] = []
    alphas_out: dict[str, float] = {}
    notes: list[str] = []
    for i, (name, module) in enumerate(sorted(loaded.modules.items())):
        target = module.target
        rank_in = rank_of(module.family, module.tensors)
        src_dtype = module.tensors.get("down", next(iter(module.tensors.values()))).dtype
        down, up, alpha, err = to_lora_factors(module, max_rank=max_rank, rel_tol=rel_tol)
        if err > max_error:
            too_far.append(f"{name} ({err:.3g})")
        k = down.shape[0]
        keep_rank = None
        if naming_in == naming_out and module.family == "lora" and "mid" not in module.tensors and k == rank_in:
            keep_rank = (module.tensors["down"].shape, module.tensors["up"].shape)
        down, up = _out_shapes(target, naming_out, down, up, keep_rank)
        out_alpha = None
        if keeps_alpha:
            out_alpha = _alpha_tensor(module, alpha, dtype or dtypes.name_of(src_dtype))
        else:
            up = up * (alpha / k)  # fold alpha/rank into lora_B; lora_alpha = rank reproduces ΔW
            alphas_out[target.peft_module] = alpha
        out_dt = dtypes.to_torch(dtype) if dtype else src_dtype
        up_bias = bias_delta(module) if "up_bias" in module.tensors else None  # PEFT output: scale 1
        if up_bias is not None and not dtype:
            up_bias = up_bias.to(out_dt)
        tensors.update(module_tensors(
            target, naming_out, down.to(out_dt) if not dtype else down, up.to(out_dt) if not dtype else up,
            out_alpha, module.dora_scale, up_bias,
        ))
        if module.family == "lora" and (max_rank is None or (rank_in or 0) <= max_rank):
            how = "folded mid" if "mid" in module.tensors else "kept"
        else:
            how = "svd"
        results.append(ModuleResult(name, module.family, rank_in, k, err, how))
        if on_progress:
            on_progress(i + 1, len(loaded.modules), name)
    for address, tensor in sorted(loaded.replaced.items()):
        tensors[replaced_key(loaded.arch, address, naming_out)] = tensor
    if too_far:
        raise MappingError(
            f"{source.path}: {len(too_far)} modules exceed --max-error {max_error:g} as LoRA: {listing(too_far, 4)}",
            hint="raise --max-rank (or leave it unset), or raise --max-error to accept the loss",
        )
    out_dtype = dtype
    specs = {}
    clamped: list[tuple[str, int]] = []
    for key, t in list(tensors.items()):
        if out_dtype and t.is_floating_point() and not is_alpha_key(key):
            t, n = dtypes.cast(t.float(), out_dtype)
            if n:
                clamped.append((key, n))
            tensors[key] = t
        specs[key] = TensorSpec(tuple(t.shape), dtypes.name_of(t.dtype))
    metadata = {k: v for k, v in loaded.metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash", PEFT_ALPHA_KEY)}
    fams = sorted(loaded.families)
    if any(m.how == "svd" for m in results):
        # the training record described the LyCORIS network; say what the file now holds
        dim = max(m.rank_out for m in results)
        metadata.pop("ss_network_args", None)
        metadata.update(network_fields(str(dim), str(dim)))
        metadata["loratool.converted_from"] = ",".join(fams)
        notes.append(f"ss_network_module/_dim/_alpha describe the plain LoRA now (max rank {dim}, alpha = rank per module)")
    if not keeps_alpha:
        metadata.setdefault("format", "pt")
        if naming_in == "kohya":
            metadata[PEFT_ALPHA_KEY] = json.dumps(alphas_out, sort_keys=True)
        elif PEFT_ALPHA_KEY in source.metadata:
            metadata[PEFT_ALPHA_KEY] = source.metadata[PEFT_ALPHA_KEY]  # PEFT ↔ diffusers: the fold is unchanged
    elif container_for(out) == "safetensors" and ("sshs_model_hash" in source.metadata or naming_in != "kohya"):
        from ..metadata import with_hashes

        metadata = with_hashes(tensors, metadata)
    if naming_in != naming_out:
        notes.append(f"renamed {len(results)} modules {naming_in} → {naming_out}")
    if not keeps_alpha:
        notes.append("alpha/rank folded into lora_B (load with lora_alpha = rank); original alphas in metadata " + PEFT_ALPHA_KEY)
    if container_for(out) == "pickle" and metadata:
        notes.append(f"dropped {len(metadata)} metadata entries: a torch pickle has no metadata field")
    with open_writer(out, specs, metadata, [source.path], force, wrap=False) as writer:
        for key in specs:
            writer.write(key, tensors[key])
        writer.finalize(metadata if container_for(out) == "safetensors" else None)
    return ConvertReport(
        input=str(source.path),
        output=str(out),
        kind="adapter",
        container_in=source.format,
        container_out=container_for(out),
        tensors_in=len(source.keys()),
        tensors_out=len(specs),
        bytes_out=out.stat().st_size,
        dtype=dtype,
        arch=loaded.arch,
        naming_in=naming_in,
        naming_out=naming_out,
        families_in=tuple(fams),
        clamped=tuple(clamped),
        modules=tuple(results),
        max_rel_error=max((m.rel_error for m in results), default=0.0),
        notes=tuple(notes),
    )


def _check_roles(path: str, modules: Mapping[str, AdapterModule]) -> None:
    """Every role of every module is one its family converts, and the required ones are there
    (a key is never dropped silently)."""
    problems = []
    for name, m in modules.items():
        roles = set(m.tensors)
        extra = roles - (FAMILIES[m.family].roles if m.family in FAMILIES else set())
        if extra:
            problems.extend(m.keys.get(r, f"{name}.{r}") for r in sorted(extra))
        missing = missing_roles(m.family, roles)
        if missing:
            problems.append(f"{name} (incomplete {m.family}: {missing})")
    if problems:
        raise MappingError(
            f"{path}: {len(problems)} keys do not fit their module's family: {listing(problems, 4)}",
            hint="the file mixes adapter families in one module or is truncated",
        )


def _undo_peft_fold(loaded, recorded: dict[str, float], naming_in: str) -> None:
    """A PEFT/diffusers file that loratool wrote records each module's original alpha (the fold of
    ``alpha/rank`` into ``lora_B`` is undone for kohya output: up·rank/alpha, alpha restored; ΔW unchanged)."""
    if naming_in == "kohya" or not recorded:
        return
    for name, m in list(loaded.modules.items()):
        original = recorded.get(m.target.peft_module)
        if not original or m.family != "lora" or "alpha" in m.tensors:
            continue
        k = m.tensors["down"].shape[0]
        loaded.modules[name] = replace(m, tensors={**m.tensors, "up": m.tensors["up"] * (k / original),
                                                   "alpha": torch.tensor(original, dtype=torch.float64)})


def _alpha_tensor(module: AdapterModule, alpha: float, dtype: str) -> torch.Tensor:
    """The output alpha: the input's own tensor when the value is unchanged, else a new scalar."""
    old = module.tensors.get("alpha")
    if old is not None and float(old.double().reshape(-1)[0]) == alpha:
        return alpha_in_dtype(old, dtype)
    return alpha_in_dtype(torch.tensor(alpha, dtype=torch.float64), dtype)


# ----------------------------------------------------------------------------- entry point

TARGETS = ("kohya", "peft", "diffusers", "ldm", "lora", "comfyui")


def convert(
    source: TensorSource,
    out: str | os.PathLike,
    to: str | None = None,
    dtype: str | None = None,
    prune: bool = False,
    arch: str | None = None,
    force: bool = False,
    max_rank: int | None = None,
    max_error: float = 0.01,
    rel_tol: float = DEFAULT_REL_TOL,
    on_progress: Progress | None = None,
    prediction_type: str | None = None,
    scaled: bool = False,
):
    """Convert one model file; the output's extension decides its container.

    Args:
        source: an open :class:`~loratool.io.source.TensorSource`.
        out: output file (``.safetensors`` or ``.ckpt``/``.pt``/``.pth``/``.bin``), or a folder for
            ``to="diffusers"`` on a full checkpoint.
        to: ``None`` (same naming; container, dtype, prune only), ``kohya`` / ``peft`` /
            ``diffusers`` (LoRA naming; for a full checkpoint ``diffusers`` means the folder layout),
            ``ldm`` (full checkpoint → single file), ``lora`` (plain LoRA, same naming).
        dtype: safetensors dtype name (``F16``, ``BF16``, ``F32``, ``F8_E4M3``, ``F8_E5M2``) for float tensors.
        prune: drop :data:`PRUNE_RULES` keys (full checkpoints).
        arch: ``sd1`` / ``sd2`` / ``sdxl`` instead of detection.
        max_rank, max_error, rel_tol: LyCORIS → LoRA refactoring (see :func:`to_lora_factors`).
        on_progress: called as ``(done, total, name)`` after each tensor or module.
        scaled: with an fp8 ``dtype``, write ComfyUI scaled fp8 (FLUX.1; see :func:`_copy`).

    Returns:
        :class:`ConvertReport` (or the checkpoint converter's report for ``ldm``/``diffusers`` layout changes).

    Raises:
        LoratoolError: unmappable keys, an existing output without ``force``, an unknown target.
    """
    out = Path(out)
    if to is not None and to not in TARGETS:
        raise LoratoolError(f"unknown conversion target {to!r}", hint=f"use one of {', '.join(TARGETS)}")
    kind = classify(source)
    if kind == "adapter":
        if prune:
            raise LoratoolError("--prune is for full checkpoints; an adapter has no EMA or training state to drop")
        if to == "ldm":
            raise LoratoolError(
                f"{source.path} is a LoRA/LyCORIS file; --to ldm converts full checkpoints",
                hint="for a LoRA use --to kohya, peft, diffusers or lora",
            )
        if to is None:
            check_output(out, [source.path], force)
            return _copy(source, out, kind, dtype, prune, force, on_progress, scaled)
        check_output(out, [source.path], force)
        container_for(out)
        return _convert_adapter(source, out, to, dtype, arch, force, max_rank, max_error, rel_tol, on_progress)
    if to in ("kohya", "peft", "lora"):
        raise LoratoolError(
            f"{source.path} is not a LoRA/LyCORIS file (it looks like a {kind}); --to {to} converts adapters",
            hint="for a full checkpoint use --to ldm or --to diffusers, or leave --to out to change container/dtype",
        )
    layout_change = to in ("ldm", "diffusers") and (to == "diffusers") != (source.format == "diffusers")
    if source.format == "diffusers" and to is None:
        raise LoratoolError(
            f"{source.path} is a diffusers folder; name the output layout",
            hint="--to ldm writes a single file; --to diffusers copies the folder",
        )
    if layout_change and any(k.endswith(".scale_weight") for k in source.keys()):
        raise LoratoolError(
            f"{source.path} is ComfyUI scaled fp8 (a scale_weight beside each fp8 weight); diffusers has no such layout",
            hint="dequantize first (loratool convert IN plain.safetensors --dtype bf16), then change the layout",
        )
    if layout_change or (source.format == "diffusers"):
        return _convert_checkpoint(source, out, to or "ldm", dtype, prune, arch, force, on_progress, prediction_type)
    check_output(out, [source.path], force)
    container_for(out)
    return _copy(source, out, kind, dtype, prune, force, on_progress, scaled)


def _convert_checkpoint(source: TensorSource, out, to, dtype, prune, arch, force, on_progress, prediction_type=None):
    """Full-checkpoint layout change (single file ↔ diffusers folder), done by loratool.convert_checkpoint."""
    if prune:
        raise LoratoolError(
            "--prune with a layout change is not supported in one step",
            hint="prune first (loratool convert IN pruned.safetensors --prune), then change the layout",
        )
    from .layout import convert_checkpoint

    if to == "ldm" and container_for(out) != "safetensors":
        raise OutputError(
            f"{out}: --to ldm writes a .safetensors file",
            hint="write .safetensors, then convert that file to .ckpt without --to",
        )
    return convert_checkpoint(source, out, to=to, arch=arch, dtype=dtype, force=force, on_progress=on_progress,
                              prediction_type=prediction_type)


__all__ = [
    "KEEP_DTYPE_KEYS",
    "PRUNE_RULES",
    "TARGETS",
    "ConvertReport",
    "ModuleResult",
    "alpha_in_dtype",
    "classify",
    "convert",
    "prune_reason",
]
