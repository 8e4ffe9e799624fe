"""Merging: adapters into a checkpoint (streamed key by key), and LoRAs into one LoRA (exact concat or SVD).

Pure library code: no printing, no rich/click. Progress goes through an ``on_progress(done, total, note)``
callback. Formulas (one module m of adapter i, per-adapter ratio ρᵢ, component ratio κ, block weight β):

    checkpoint   W ← W + ρᵢ·κ·β · (alphaₘ/rankₘ)·ΔWₘ          (DoRA: see adapters.apply_to_weight)
    concat       up = [sᵢ·√|cᵢ|·upᵢ]ᵢ, down = [√|cᵢ|·downᵢ]ᵢ, alpha = rank = Σ rᵢ   with cᵢ = ρᵢ·alphaᵢ/rᵢ, sᵢ = sign(cᵢ)
    svd          U S Vᵀ = [cᵢ·upᵢ]ᵢ @ [downᵢ]ᵢ (factored, no dense ΔW); up = U√S, down = √S Vᵀ, alpha = rank = N

LoHa / LoKr / LoCon-Tucker parts of a LoRA+LoRA merge are first turned into LoRA factors (ops.convert).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from .. import dtypes
from ..adapters import AdapterModule, LoadedAdapter, apply_to_weight, delta, rank_of, scale_of
from ..adapters.io import fuse_parts, module_tensors, save_adapter, split_fused, split_swapped
from ..adapters.math import bias_delta
from ..arch import ARCH_LABELS, DENOISERS
from ..blockweights import BlockWeights
from ..detect import detect_checkpoint, is_adapter
from ..errors import LoratoolError, MappingError, OutputError, listing
from ..io import stream
from ..io.folder import FolderOutput, weight_file
from ..io.output import open_writer
from ..io.source import MODEL_SUFFIXES, TensorSource, TensorSpec
from ..io.writer import SafetensorsWriter, check_output, container_for
from ..metadata import parse_json_field
from ..metadata.kohya import conv_network_args, dim_text, network_fields
from ..progress import Progress
from ..runtime import resolve_device, split_rows, threads, threads_for
from .lowrank import factored_svd

RECIPE_KEY = "loratool.merge.recipe"


# ----------------------------------------------------------------------------- argument parsing


def parse_adapter_arg(arg: str, lora_dir: str | os.PathLike | None = None) -> tuple[Path, float]:
    """``PATH``, ``PATH:RATIO`` or A1111's ``<lora:NAME:RATIO>`` → (path, ratio); ratio defaults to 1.0.

    A whole argument that names an existing file wins, so paths containing ``:`` work. ``<lora:NAME>``
    looks for NAME, NAME.safetensors, NAME.ckpt, ... in ``lora_dir`` (default: the current folder).

    Raises:
        LoratoolError: the file does not exist, or the text after the last ``:`` is not a number.
    """
    text = arg.strip()
    if text.startswith("<") and text.endswith(">"):
        parts = text[1:-1].split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("lora", "lyco"):
            raise LoratoolError(f"{arg!r} is not an A1111 prompt tag", hint="write it as <lora:NAME:RATIO>")
        ratio = _ratio(parts[2], arg) if len(parts) == 3 else 1.0
        folder = Path(lora_dir) if lora_dir else Path(".")
        for cand in (parts[1], *(parts[1] + s for s in MODEL_SUFFIXES)):
            if (folder / cand).is_file():
                return folder / cand, ratio
        raise LoratoolError(
            f"no LoRA named {parts[1]!r} in {folder}", hint="pass --lora-dir DIR, the folder A1111 reads LoRAs from"
        )
    if Path(text).exists():
        return Path(text), 1.0
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        ratio = _ratio(tail, arg)
        if not Path(head).is_file():
            raise LoratoolError(
                f"{head}: no such file (from {arg!r})", hint="check the path; write PATH:RATIO, e.g. style.safetensors:0.8"
            )
        return Path(head), ratio
    raise LoratoolError(f"{text}: no such file", hint="check the path")


def _ratio(text: str, arg: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoratoolError(
            f"{arg!r} is neither an existing file nor PATH:RATIO ({text!r} is not a number)",
            hint="write PATH:RATIO with one number after the last ':', e.g. style.safetensors:0.8",
        ) from None
    if not math.isfinite(value):
        raise LoratoolError(f"ratio {text!r} in {arg!r} is not finite", hint="use a number like 0.8 or -0.5")
    return value


def looks_like_adapter(keys: Iterable[str]) -> bool:
    """True when the keys are an adapter's (:func:`loratool.detect.is_adapter`, the one rule)."""
    return is_adapter(list(keys))


# ----------------------------------------------------------------------------- into a checkpoint


@dataclass(frozen=True)
class Assignment:
    """One adapter module applied to one base weight (or a row slice of it)."""

    key: str
    rows: tuple[int, int] | None
    adapter: int
    module: str
    family: str
    ratio: float
    part: str = "weight"  # "bias": the module's bias ΔW (diff_b, lora_B.bias); "set": a tensor given in full
    shape: tuple[int, ...] | None = None  # the output's shape when the module widens the weight (FLUX img_in)


@dataclass(frozen=True)
class MergeReport:
    out: str | None
    arch: str
    naming: str
    adapters: tuple[tuple[str, float], ...]
    assignments: tuple[Assignment, ...]
    unmapped: tuple[tuple[str, str], ...]
    changed: tuple[str, ...]
    keys_total: int
    seconds: float
    dry_run: bool
    stream: stream.StreamStats | None = None  # the streaming engine's budget and peaks (None for a dry run)


def plan_checkpoint_merge(
    base_specs: dict[str, TensorSpec],
    base_naming: str,
    adapters: Sequence[tuple[LoadedAdapter, float]],
    te_ratio: float = 1.0,
    unet_ratio: float = 1.0,
    block_weights: BlockWeights | None = None,
    prefix: str = "",
) -> tuple[list[Assignment], list[tuple[str, str]]]:
    """Which module changes which base key, at which effective ratio (ρ·κ·β); plus (adapter, module)
    pairs whose target weight the base file lacks."""
    plan: list[Assignment] = []
    missing: list[tuple[str, str]] = []
    misfit: list[str] = []
    for i, (ad, ratio) in enumerate(adapters):
        if base_naming == "diffusers":
            split_fused(ad)
        else:
            split_swapped(ad)
        for name in sorted(ad.modules):
            m = ad.modules[name]
            t = m.target
            key = (prefix + t.address if t.component == "transformer" else t.address) if base_naming == "ldm" \
                else t.diffusers_key
            rows = t.rows if base_naming == "ldm" else None
            if key not in base_specs:
                missing.append((ad.path, f"{name} → {key}"))
                continue
            want = t.shape if base_naming == "ldm" else t.target_shape
            have = tuple(base_specs[key].shape)
            widen = None
            if have != tuple(want):
                if base_naming == "ldm" and widens(t, have, want):
                    widen = tuple(want)
                else:
                    misfit.append(f"{name} needs {key} {tuple(want)}, the base has {have}")
                    continue
            comp = unet_ratio if t.component in DENOISERS else te_ratio
            bw = block_weights.weight_for(t) if block_weights is not None else 1.0
            plan.append(Assignment(key, rows, i, name, m.family, ratio * comp * bw, shape=widen))
            if "diff_b" in m.tensors or "up_bias" in m.tensors:  # the bias ΔW goes to the bias beside the weight
                bias = key.removesuffix("weight") + "bias"
                if bias not in base_specs:
                    missing.append((ad.path, f"{name} bias → {bias}"))
                else:
                    plan.append(Assignment(bias, rows, i, name, m.family, ratio * comp * bw, "bias"))
        for address in sorted(ad.replaced):
            key = prefix + address if base_naming == "ldm" else _diffusers_key(address)
            if key not in base_specs:
                missing.append((ad.path, f"{address} (given in full) → {key}"))
            elif tuple(base_specs[key].shape) != tuple(ad.replaced[address].shape):
                misfit.append(f"{address} is {tuple(ad.replaced[address].shape)}, the base has {tuple(base_specs[key].shape)}")
            else:
                plan.append(Assignment(key, None, i, address, "set", ratio, "set"))
    sets = [a.key for a in plan if a.part == "set"]
    if len(sets) != len(set(sets)):
        raise MappingError(f"two adapters replace the same tensors: {listing(sorted({k for k in sets if sets.count(k) > 1}))}",
                           hint="merge one control LoRA at a time")
    if misfit:
        raise MappingError(
            f"{len(misfit)} modules do not fit the base's weights: {listing(misfit, 3)}",
            hint="the LoRA was made for a model of another size; check that base and LoRA are the same architecture",
        )
    return plan, missing


def widens(target, have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Does a module for ``want`` fit a base weight ``have`` that is narrower only in its input width, on a layer
    whose input width is a model setting (FLUX ``img_in``: 64 for dev, 128 for a Depth/Canny control LoRA)? The
    merge then widens the weight with zero columns first — what diffusers does when it loads such a LoRA — and
    writes a checkpoint of the wider layout (a Depth/Canny-layout FLUX.1 file)."""
    return (target.address == "img_in.weight" and len(have) == len(want) == 2 and have[0] == want[0]
            and have[1] < want[1])


def _diffusers_key(address: str) -> str:
    from ..arch.sd_checkpoint import checkpoint_links

    return checkpoint_links("flux1").diffusers_of(address) or address


def _module_on(module: AdapterModule, device: torch.device) -> AdapterModule:
    if device.type == "cpu":
        return module
    return replace(module, tensors={k: v.to(device) for k, v in module.tensors.items()})


def require_finite(adapters: Sequence[tuple[LoadedAdapter, float]], allow_nonfinite: bool = False) -> None:
    """Refuse adapters with NaN/Inf values: merged, they would poison every weight they touch."""
    if allow_nonfinite:
        return
    bad = [
        f"{ad.path}: {m.keys.get(role, m.target.name + '.' + role)}"
        for ad, _ in adapters
        for m in ad.modules.values()
        for role, t in m.tensors.items()
        if not dtypes.all_finite(t)
    ]
    if bad:
        raise LoratoolError(
            f"{len(bad)} adapter tensors hold NaN or Inf: {listing(bad, 3)}",
            hint="the LoRA is broken (training diverged?); pass --allow-nonfinite to merge anyway",
        )


def merge_into_checkpoint(
    base_source: TensorSource,
    adapters: Sequence[tuple[LoadedAdapter, float]],
    out: str | os.PathLike | None,
    *,
    arch: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    te_ratio: float = 1.0,
    unet_ratio: float = 1.0,
    block_weights: BlockWeights | None = None,
    allow_unmapped: bool = False,
    force: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    on_progress: Progress | None = None,
) -> MergeReport:
    """Merge adapters into a checkpoint, streaming one base tensor at a time.

    Every base key is kept with its dtype (or ``dtype`` for float tensors); only the targeted weights
    change, each computed in float32 on ``device`` as ``W + ratio·scale·ΔW`` (adapters applied in order).

    Args:
        base_source: a lazy source of a single-file (LDM/SGM) checkpoint or a diffusers folder.
        adapters: (adapter, ratio) pairs; ratios may be negative.
        out: output ``.safetensors`` (ignored with ``dry_run``).
        te_ratio / unet_ratio: multiply each adapter's ratio for text-encoder / UNet modules.
        block_weights: per-block multipliers (LoRA Block Weight).
        allow_unmapped: list adapter keys or targets that map nowhere instead of failing.

    Raises:
        MappingError: an adapter is for another architecture, keys map nowhere, or the base lacks a target.
        OutputError: ``out`` exists (without ``force``) or is an input.
    """
    start = time.perf_counter()
    require_finite(adapters, allow_nonfinite)
    specs = {k: base_source.spec(k) for k in base_source.keys()}
    match = detect_checkpoint(specs, arch)
    for ad, _ in adapters:
        if ad.arch != match.arch:
            raise MappingError(
                f"{ad.path} is an {ARCH_LABELS[ad.arch]} adapter but {base_source.path} "
                f"is an {ARCH_LABELS[match.arch]} checkpoint",
                hint="merge adapters made for the same base model family",
            )
    plan, missing = plan_checkpoint_merge(specs, match.naming, adapters, te_ratio, unet_ratio, block_weights, match.prefix)
    unmapped = [(ad.path, k) for ad, _ in adapters for k in ad.unmapped] + missing
    if unmapped and not allow_unmapped:
        raise MappingError(
            f"{len(unmapped)} adapter keys map to no weight of {base_source.path}: "
            f"{listing([f'{p}: {k}' for p, k in unmapped], 5)}",
            hint="check that the adapter fits this base, or pass --allow-unmapped to skip them (they are listed)",
        )
    names = tuple((ad.path, r) for ad, r in adapters)
    changed = tuple(sorted({a.key for a in plan if a.ratio != 0}))
    if dry_run:
        return MergeReport(None, match.arch, match.naming, names, tuple(plan), tuple(unmapped), changed, len(specs), 0.0, True)

    by_key: dict[str, list[Assignment]] = {}
    for a in plan:
        if a.ratio != 0:
            by_key.setdefault(a.key, []).append(a)
    out_dtype = dtypes.parse_cli(dtype) if dtype else None
    widened = {a.key: a.shape for a in plan if a.shape is not None}
    out_specs = {
        k: TensorSpec(widened.get(k, s.shape), out_dtype if out_dtype and s.dtype in dtypes.FLOAT_NAMES else s.dtype)
        for k, s in specs.items()
    }
    dev = resolve_device(device)
    inputs = [base_source.path, *(ad.path for ad, _ in adapters)]
    metadata = _checkpoint_metadata(base_source, adapters, te_ratio, unet_ratio, block_weights, out_dtype)
    total = len(specs)
    with ExitStack() as stack:  # any exception (or SIGTERM) removes every temporary file and folder
        writers = _open_writers(stack, Path(out), base_source, out_specs, metadata, inputs, force,
                                folder=match.naming == "diffusers")
        files = list({id(w): w for w, _ in writers.values()}.values())

        def merged(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
            assignments = by_key[key]
            mods = [adapters[a.adapter][0].modules.get(a.module) for a in assignments]

            writer, name = writers[key]
            scale = _fp8_scale(base_source, specs, key)
            wide = widened.get(key)
            if (scale is None and wide is None and dev.type == "cpu"
                    and all(_plain_lora(a, m) for a, m in zip(assignments, mods))):
                return lambda tensor: _merge_blocked(tensor, assignments, mods, writer, name)

            def fn(tensor: torch.Tensor) -> torch.Tensor:
                work = tensor.numel() * sum(rank_of(m.family, m.tensors) or 64 for m in mods if m is not None)
                with threads(threads_for(work) if dev.type == "cpu" else None):
                    w = tensor.to(dev, torch.float32)
                    if scale is not None:
                        w = w * scale
                    if wide is not None:  # new input columns start at zero (diffusers' expansion rule)
                        w = torch.cat([w, w.new_zeros(w.shape[0], wide[1] - w.shape[1])], dim=1)
                    for a, m in zip(assignments, mods):
                        if a.part == "set":
                            w = adapters[a.adapter][0].replaced[a.module].to(dev, torch.float32).reshape(w.shape).clone()
                            continue
                        module = _module_on(m, dev)
                        lo, hi = a.rows if a.rows is not None else (0, w.shape[0])
                        if a.part == "bias":
                            w[lo:hi] += a.ratio * bias_delta(module).reshape(w[lo:hi].shape)
                        else:
                            w[lo:hi] = apply_to_weight(w[lo:hi], module, a.ratio)
                return w if scale is None else w / scale  # scaled fp8 keeps its scale; the cast clamps to its range

            return fn

        items = [stream.Item(writers[k][0], writers[k][1], (k,), merged(k) if k in by_key else None, specs[k].nbytes)
                 for k in specs]
        stats = stream.run(base_source, items, on_progress=on_progress)
        for fw in files:
            fw.finalize(fw.metadata if isinstance(fw, SafetensorsWriter) else None)
    path = Path(out)
    return MergeReport(
        str(path), match.arch, match.naming, names, tuple(plan), tuple(unmapped), changed, total,
        round(time.perf_counter() - start, 3), False, stats,
    )




def _fp8_scale(source: TensorSource, specs: Mapping[str, TensorSpec], key: str) -> float | None:
    """ComfyUI scaled fp8: the weight ``W`` of ``key`` is ``stored · scale_weight`` (a float32 scalar
    beside it); None for any other weight."""
    scale_key = key.removesuffix("weight") + "scale_weight"
    if not key.endswith(".weight") or scale_key not in specs or specs[key].dtype not in ("F8_E4M3", "F8_E5M2"):
        return None
    return float(source.get(scale_key).float().reshape(-1)[0])


def _plain_lora(a: Assignment, m: AdapterModule) -> bool:
    return a.part == "weight" and m.family == "lora" and "mid" not in m.tensors and not m.is_dora


_BLOCK_BYTES = 1 << 20  # fp32 rows per block: ~1 MiB stays in cache through convert, update and cast


def _merge_blocked(tensor: torch.Tensor, assignments, mods, writer, name: str) -> torch.Tensor:
    """``W + Σ ratio·(alpha/rank)·up @ down`` for plain LoRA modules, a block of rows at a time.

    The same float32 arithmetic as :func:`~loratool.adapters.apply_to_weight` (one ``addmm`` per
    module on the rows it covers), but each block is converted, updated and cast to the output dtype
    while it is in cache, straight into the output tensor, instead of three passes over the whole
    weight in memory.
    """
    rows = tensor.shape[0]
    flat = tensor.reshape(rows, -1)
    out_dtype = writer.specs[name].dtype
    out = torch.empty(flat.shape, dtype=dtypes.to_torch(out_dtype))
    factors = []
    for a, m in zip(assignments, mods):
        up = m.tensors["up"].float().reshape(m.tensors["up"].shape[0], -1) * (a.ratio * scale_of("lora", m.tensors))
        down = m.tensors["down"].float().reshape(m.tensors["down"].shape[0], -1)
        lo, hi = a.rows if a.rows is not None else (0, rows)
        if up.shape[0] != hi - lo or down.shape[1] != flat.shape[1]:
            raise MappingError(
                f"{m.target.name}: ΔW is {up.shape[0]}×{down.shape[1]}, its target {name} rows {lo}:{hi} are "
                f"{hi - lo}×{flat.shape[1]}", hint="the adapter was made for a different model")
        factors.append((lo, hi, up, down))
    cols = flat.shape[1]
    step = max(1, _BLOCK_BYTES // (4 * max(1, cols)))

    def run(r0: int, r1: int) -> int:  # rows r0:r1, one float32 block buffer reused: no allocation per block
        buf = torch.empty(min(step, r1 - r0) * cols)
        clamped = 0
        for i in range(r0, r1, step):
            j = min(r1, i + step)
            block = buf[:(j - i) * cols].view(j - i, cols)
            block.copy_(flat[i:j])
            for lo, hi, up, down in factors:
                a, b = max(i, lo), min(j, hi)
                if a < b:
                    block[a - i:b - i].addmm_(up[a - lo:b - lo], down)
            clamped += dtypes.cast(block, out_dtype, out=out[i:j])[1]  # cast straight into the output
        return clamped

    clamped = sum(split_rows(rows, step, run))
    if clamped:
        writer.clamped[name] = writer.clamped.get(name, 0) + clamped
    return out.reshape(tensor.shape)


def _open_writers(stack: ExitStack, out: Path, base_source: TensorSource, out_specs, metadata, inputs, force: bool, folder: bool):
    """key → (writer, name in that writer's file), every writer entered on ``stack``. One file for a
    single-file base (container from ``out``'s extension); for a diffusers base, an atomic folder with one
    file per component (``unet/diffusion_pytorch_model.safetensors``...) plus copies of its config files."""
    kind = container_for(out, folder_ok=True)
    if not folder:
        if kind == "folder":
            raise OutputError(f"{out}: merging into a single-file checkpoint writes a file",
                              hint="name it .safetensors (or .ckpt); convert it to a diffusers folder afterwards")
        w = stack.enter_context(open_writer(out, out_specs, metadata, inputs=inputs, force=force, wrap=True))
        return {k: (w, k) for k in out_specs}
    if kind != "folder":
        raise OutputError(f"{out}: merging into a diffusers folder writes a folder",
                          hint="name the output without an extension; convert it to a single file afterwards")
    target = stack.enter_context(FolderOutput(out, inputs, force))
    root = target.tmp
    base_dir = Path(base_source.path)
    for f in sorted(base_dir.rglob("*")):
        if f.is_file() and not f.name.endswith(MODEL_SUFFIXES) and not f.name.endswith(".index.json"):
            dest = root / f.relative_to(base_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    by_comp: dict[str, dict[str, TensorSpec]] = {}
    for k, spec in out_specs.items():
        comp, name = k.split("/", 1)
        by_comp.setdefault(comp, {})[name] = spec
    writers = {}
    for comp, specs in sorted(by_comp.items()):
        fname = weight_file(comp)
        (root / comp).mkdir(parents=True, exist_ok=True)
        w = stack.enter_context(SafetensorsWriter(root / comp / fname, specs, metadata))
        for name in specs:
            writers[f"{comp}/{name}"] = (w, name)
    return writers


def _recipe(adapters: Sequence[tuple[LoadedAdapter, float]], **extra) -> str:
    data = {"adapters": [{"file": Path(ad.path).name, "ratio": r} for ad, r in adapters], **extra}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _checkpoint_metadata(base_source: TensorSource, adapters, te_ratio, unet_ratio, block_weights, out_dtype) -> dict[str, str]:
    meta = {k: v for k, v in base_source.metadata.items() if k not in ("modelspec.hash_sha256", "model_index")}
    base = Path(base_source.path).name
    meta[RECIPE_KEY] = _recipe(
        adapters,
        base=base,
        te_ratio=te_ratio,
        unet_ratio=unet_ratio,
        lbw=block_weights.as_dict() if block_weights else None,
        dtype=out_dtype,
    )
    meta["modelspec.merged_from"] = ", ".join([base, *(f"{Path(ad.path).name}:{r:g}" for ad, r in adapters)])
    return meta


# ----------------------------------------------------------------------------- LoRA + LoRA → LoRA


@dataclass(frozen=True)
class ModuleResult:
    name: str
    rank: int
    rel_error: float
    conv3x3: bool = False


@dataclass(frozen=True)
class AdapterMergeReport:
    out: str
    arch: str
    mode: str
    adapters: tuple[tuple[str, float], ...]
    modules: tuple[ModuleResult, ...]
    seconds: float

    @property
    def max_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)


CONVERT_REL_TOL = 1e-6


class _Factors(NamedTuple):
    up: torch.Tensor  # (out, r), float32
    down: torch.Tensor  # (r, in·kh·kw), float32
    tail: tuple[int, ...]  # down's trailing shape
    scale: float
    converted: bool  # refactored from a LoHa/LoKr/Tucker module


def _factors(module: AdapterModule, path: str) -> _Factors:
    """A module as plain LoRA factors for a LoRA+LoRA merge.

    Plain LoRA modules give their own factors and ``alpha/rank``. LoHa, LoKr and LoCon-Tucker modules go
    through :func:`loratool.adapters.to_lora_factors` (Tucker: exact; LoHa/LoKr: SVD of their ΔW to
    relative error ≤ 1e-6), whose factors carry the module's scale (alpha = rank).
    """
    if module.is_dora:
        raise LoratoolError(
            f"{path}: module {module.target.name} is DoRA; its magnitude cannot be summed into a LoRA",
            hint="merge DoRA adapters into a checkpoint instead (LoRA+LoRA merges take LoRA/LoCon/LoHa/LoKr)",
        )
    if module.family == "lora" and "mid" not in module.tensors:
        up, down = module.tensors["up"].float(), module.tensors["down"].float()
        return _Factors(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), tuple(down.shape[1:]),
                        scale_of(module.family, module.tensors), False)
    if module.family not in ("lora", "loha", "lokr"):
        raise LoratoolError(
            f"{path}: module {module.target.name} is a {module.family} module; LoRA+LoRA merges cannot take it",
            hint="merge it into a checkpoint instead",
        )
    from ..adapters import to_lora_factors

    down, up, alpha, _ = to_lora_factors(module, rel_tol=CONVERT_REL_TOL)
    return _Factors(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), tuple(down.shape[1:]),
                    alpha / down.shape[0], True)


def merge_adapters(
    adapters: Sequence[tuple[LoadedAdapter, float]],
    out: str | os.PathLike,
    *,
    mode: str = "concat",
    rank: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    te_ratio: float = 1.0,
    unet_ratio: float = 1.0,
    block_weights: BlockWeights | None = None,
    allow_unmapped: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    on_progress: Progress | None = None,
) -> AdapterMergeReport:
    """Merge LoRAs into one LoRA (kohya naming) whose ΔW is ``Σ ratioᵢ·scaleᵢ·ΔWᵢ``.

    ``te_ratio`` / ``unet_ratio`` / ``block_weights`` multiply ratioᵢ per module as in
    :func:`merge_into_checkpoint`; a module whose parts all end up at ratio 0 is left out.

    ``concat`` is exact: factors are stacked along the rank with each part's ``ratio·alpha/rank``
    folded into them and the result stored with ``alpha = rank`` (scale 1). ``svd`` keeps the best
    rank-``rank`` approximation of that sum, computed from the stacked factors (QR + a small SVD);
    each module's relative Frobenius error is reported.
    """
    start = time.perf_counter()
    if not adapters:
        raise LoratoolError("no adapters to merge")
    require_finite(adapters, allow_nonfinite)
    arch = adapters[0][0].arch
    for ad, _ in adapters:
        if ad.arch != arch:
            raise MappingError(
                f"{ad.path} is for {ARCH_LABELS[ad.arch]}, {adapters[0][0].path} for {ARCH_LABELS[arch]}",
                hint="merge adapters made for the same base model family",
            )
    unmapped = [f"{ad.path}: {k}" for ad, _ in adapters for k in ad.unmapped]
    if unmapped and not allow_unmapped:
        raise MappingError(
            f"{len(unmapped)} adapter keys map to no {ARCH_LABELS[arch]} module: {listing(unmapped, 5)}",
            hint="pass --allow-unmapped to leave them out",
        )
    if mode not in ("concat", "svd"):
        raise LoratoolError(f"unknown --mode {mode!r}", hint="use concat or svd")
    control = [ad.path for ad, _ in adapters if ad.is_control]
    if control:
        raise MappingError(f"{listing(control)}: a control LoRA (LoRA biases, norm scales given in full) does not "
                           "merge into another LoRA", hint="merge it into the checkpoint instead")
    for ad, _ in adapters:  # one module per kohya name: PEFT / XLabs parts of a fused tensor joined exactly first
        fuse_parts(ad)
    if mode == "svd" and (rank is None or rank < 1):
        raise LoratoolError("--mode svd needs --rank N (N ≥ 1)", hint="e.g. --mode svd --rank 32")
    dev = resolve_device(device)
    container_for(out)
    check_output(Path(out), [ad.path for ad, _ in adapters], force)
    first_dtype = next(iter(next(iter(adapters[0][0].modules.values())).tensors.values())).dtype
    out_dtype = dtypes.to_torch(dtypes.parse_cli(dtype)) if dtype else first_dtype
    names = sorted({n for ad, _ in adapters for n in ad.modules})
    tensors: dict[str, torch.Tensor] = {}
    results: list[ModuleResult] = []
    for step, name in enumerate(names, 1):
        ups, downs, tail, parts, converted = [], [], None, [], False
        target = None
        for ad, ratio in adapters:
            m = ad.modules.get(name)
            if m is None:
                continue
            target = m.target
            eff = ratio * (unet_ratio if m.target.component in DENOISERS else te_ratio)
            eff *= block_weights.weight_for(m.target) if block_weights is not None else 1.0
            if eff == 0:
                continue
            up, down, t, scale, was_converted = _factors(m, ad.path)
            tail = tail or t
            converted = converted or was_converted
            c = eff * scale
            ups.append((c, up.to(dev)))
            downs.append(down.to(dev))
            parts.append((m, eff))
        if not ups:
            continue
        if mode == "concat":
            up = torch.cat([math.copysign(math.sqrt(abs(c)), c) * u for c, u in ups], dim=1)
            down = torch.cat([math.sqrt(abs(c)) * d for (c, _), d in zip(ups, downs)], dim=0)
            err = 0.0
        else:
            u_all = torch.cat([c * u for c, u in ups], dim=1)
            d_all = torch.cat(downs, dim=0)
            uu, s, vh = factored_svd(u_all, d_all)
            k = min(rank, s.shape[0])
            root = s[:k].sqrt()
            up, down = uu[:, :k] * root, root[:, None] * vh[:k]
            total = float(s.square().sum())
            err = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
        if converted:  # some part is an SVD of a LoHa/LoKr ΔW: measure the error against the exact sum, densely
            err = _dense_error(up, down, parts, tail)
        r = down.shape[0]
        conv = len(tail) > 1
        tensors.update(module_tensors(
            target, "kohya", down.reshape(r, *tail).to("cpu", out_dtype).contiguous(),
            (up.reshape(up.shape[0], r, 1, 1) if conv else up).to("cpu", out_dtype).contiguous(),
            dtypes.exact_scalar(float(r), dtypes.name_of(out_dtype)),
        ))
        results.append(ModuleResult(name, r, err, len(tail) == 3 and tuple(tail[1:]) != (1, 1)))
        if on_progress:
            on_progress(step, len(names), name)
    if not results:
        raise LoratoolError("every module ends up at ratio 0; nothing to write", hint="check the ratios and --lbw")
    extra = {"te_ratio": te_ratio, "unet_ratio": unet_ratio, "lbw": block_weights.as_dict() if block_weights else None}
    metadata = _adapter_metadata(adapters, mode, results, extra)
    path = save_adapter(out, tensors, metadata, inputs=[ad.path for ad, _ in adapters], force=force)
    return AdapterMergeReport(
        str(path), arch, mode, tuple((ad.path, r) for ad, r in adapters), tuple(results), round(time.perf_counter() - start, 3)
    )


def _dense_error(up: torch.Tensor, down: torch.Tensor, parts: list[tuple[AdapterModule, float]], tail) -> float:
    """‖up @ down − Σ ratio·scale·ΔW‖_F / ‖Σ ratio·scale·ΔW‖_F, with ΔW from the modules' own formulas."""
    shape = (up.shape[0], *tail)
    exact = sum(ratio * delta(m, shape).to(up.device).reshape(up.shape[0], -1) for m, ratio in parts)
    norm = float(exact.norm())
    return float((up @ down - exact).norm()) / norm if norm > 0 else 0.0


_DROP = (
    "sshs_model_hash", "sshs_legacy_hash", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_network_module",
    "ss_tag_frequency", "ss_output_name", "modelspec.hash_sha256",
)  # fmt: skip


def merge_tag_frequency(metadatas: Iterable[dict[str, str]]) -> dict[str, dict[str, int]]:
    """Sum kohya ``ss_tag_frequency`` ({folder: {tag: count}}) over several files."""
    total: dict[str, dict[str, int]] = {}
    for meta in metadatas:
        freq = parse_json_field(meta, "ss_tag_frequency")
        if not isinstance(freq, dict):
            continue
        for folder, tags in freq.items():
            if not isinstance(tags, dict):
                continue
            into = total.setdefault(folder, {})
            for tag, count in tags.items():
                if isinstance(count, (int, float)):
                    into[tag] = into.get(tag, 0) + int(count)
    return total


def _adapter_metadata(adapters, mode: str, results: list[ModuleResult], extra: dict) -> dict[str, str]:
    metas = [ad.metadata for ad, _ in adapters]
    # Training metadata is kept where every input agrees (same base model, resolution...).
    common = {k: v for k, v in metas[0].items() if k not in _DROP and all(m.get(k) == v for m in metas[1:])}
    conv = {r.rank for r in results if r.conv3x3}
    other = {r.rank for r in results if not r.conv3x3}
    # as kohya writes them: one number when uniform, "Dynamic" when ranks differ per module; alpha = rank everywhere
    dim = dim_text(other)
    common.update(network_fields(dim, f"{float(dim)}" if dim != "Dynamic" else dim))
    if conv:
        cdim = dim_text(conv)
        common["ss_network_args"] = conv_network_args(cdim, cdim)
    freq = merge_tag_frequency(metas)
    if freq:
        common["ss_tag_frequency"] = json.dumps(freq, sort_keys=True)
    common[RECIPE_KEY] = _recipe(adapters, mode=mode, **extra)
    return common
