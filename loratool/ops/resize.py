"""Resize a LoRA: new rank per module from the exact SVD of its factors (never the dense ΔW).

For every module, ΔW = up @ down (conv: down flattened to (r, in·kh·kw); LoCon Tucker ``mid`` folded
into down first). :func:`~loratool.ops.lowrank.factored_svd` gives its exact SVD from the factors.
The new factors split √σ to both sides, and the new alpha keeps the module's original scale
convention: ``alpha' = (alpha / r) · k``, so ``(alpha'/k)·up'·down' = (alpha/r)·U_k Σ_k V_kᵀ`` and at
full rank ΔW is unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..adapters import AdapterModule, load_adapter, scale_of
from ..adapters.io import module_tensors, save_adapter
from ..errors import DetectionError, LoratoolError
from ..io.source import open_file
from ..io.writer import check_output, container_for
from ..metadata.kohya import NETWORK_MODULE, base_model_fields, conv_network_args, dim_text, network_fields
from ..progress import Progress
from ..runtime import resolve_device, threads, threads_for
from .lowrank import (
    FIXED,
    Budget,
    RankRule,
    RankStats,
    allocate_budget,
    average_retained,
    choose_rank,
    factored_svd,
    retention,
    split_sqrt,
)


@dataclass(frozen=True)
class ResizeResult:
    """The written file and one :class:`RankStats` per module (sorted by name)."""

    path: Path
    arch: str
    naming_in: str
    rule: str
    modules: tuple[RankStats, ...]

    @property
    def average_retained(self) -> float:
        return average_retained(self.modules)


@dataclass(frozen=True)
class _Flat:
    """A LoRA module as 2-D factors: ΔW_flat = scale · up (out, r) @ down (r, in·kh·kw)."""

    module: AdapterModule
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    kernel: tuple[int, ...]  # () linear; (kh, kw) conv
    conv_kind: bool  # output with 4-D factors (kohya conv / 1x1-conv convention)


def lora_factors(module: AdapterModule) -> AdapterModule:
    """The module as plain LoRA factors.

    LoHa / LoKr / full-diff modules go through :func:`loratool.adapters.to_lora_factors` (an exact
    SVD from their factors, kept to 1e-6 relative Frobenius error); DoRA modules are refused, since
    their ΔW depends on the base weight.
    """
    if module.family == "lora" and not module.is_dora:
        return module
    from ..adapters import to_lora_factors

    if module.is_dora:
        raise DetectionError(
            f"{module.target.name} is a DoRA module; its ΔW depends on the base weight, so it has no rank to resize",
            hint="merge it into its base (loratool merge) and extract a LoRA from that (loratool extract)",
        )
    down, up, alpha, _ = to_lora_factors(module, rel_tol=1e-6)
    return AdapterModule(module.target, "lora", {"down": down, "up": up, "alpha": torch.tensor(alpha, dtype=torch.float64)})


def _flatten(module: AdapterModule) -> _Flat:
    """2-D views of the factors in their stored dtype (cast to float per batch, so memory stays low)."""
    t = module.tensors
    up = t["up"].reshape(t["up"].shape[0], -1)
    down = t["down"]
    if "mid" in t:  # Tucker: down'[a, i, h, w] = Σ_b mid[a, b, h, w]·down[b, i]
        down = torch.einsum("abhw,bi->aihw", t["mid"].float(), t["down"].float().reshape(t["down"].shape[0], -1))
    kernel = tuple(down.shape[2:])
    conv = down.dim() == 4 or module.target.kind != "linear"
    if conv and not kernel:
        kernel = (1, 1)
    return _Flat(module, up, down.reshape(down.shape[0], -1), scale_of("lora", t), kernel, conv)


def _kind(flat: _Flat) -> str:
    if flat.kernel and flat.kernel != (1, 1):
        return "conv3x3"
    return flat.module.target.kind


def resize_lora(
    path: str | os.PathLike,
    out: str | os.PathLike,
    rank: int,
    conv_rank: int | None = None,
    rule: RankRule = FIXED,
    device: str = "auto",
    dtype: str | None = None,
    arch: str | None = None,
    force: bool = False,
    on_progress: Progress | None = None,
) -> ResizeResult:
    """Write a copy of the LoRA at ``path`` with every module's rank chosen by ``rule``.

    Args:
        rank: the rank (fixed rule) or the largest rank (dynamic rules, budgets) of linear and 1x1 modules.
        conv_rank: the same for 3x3 conv modules (default ``rank``).
        rule: :class:`FixedRank`, a per-module rule or a :class:`Budget`.
        device: ``auto`` | ``cpu`` | ``cuda``; the SVDs run there in float32.
        dtype: output dtype name (``F16``...); default: the input's factor dtype.
        on_progress: ``(done, total, module name)`` after each module's factorization (:mod:`loratool.progress`).

    Raises:
        LoratoolError: rank < 1, a LoHa/LoKr/DoRA input, an unusable output path.
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise LoratoolError(f"rank must be at least 1 (got {rank if rank < 1 else conv_rank})", hint="e.g. --rank 16")
    conv_rank = rank if conv_rank is None else conv_rank
    path = Path(path)
    container_for(out)
    check_output(Path(out), [path], force)
    dev = resolve_device(device)
    with open_file(path) as source:
        loaded = load_adapter(source, arch)
    if not loaded.modules:
        raise LoratoolError(f"{path}: no LoRA modules found", hint="is this a LoRA file?")
    mods = {name: lora_factors(m) for name, m in sorted(loaded.modules.items())}
    flats = {name: _flatten(m) for name, m in mods.items()}
    out_dtype = dtype or dtypes.name_of(next(iter(mods.values())).tensors["up"].dtype)

    # Exact SVDs, batched over modules whose factor shapes agree; only the leading `cap` vectors are kept.
    caps = {n: conv_rank if _kind(f) == "conv3x3" else rank for n, f in flats.items()}
    svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    groups: dict[tuple, list[str]] = {}
    for name, f in flats.items():
        groups.setdefault((tuple(f.up.shape), tuple(f.down.shape), caps[name]), []).append(name)
    for (_, _, cap), names in groups.items():
        for start in range(0, len(names), 32):
            chunk = names[start:start + 32]
            up = torch.stack([flats[n].up for n in chunk]).to(dev, torch.float32)
            down = torch.stack([flats[n].down for n in chunk]).to(dev, torch.float32)
            # a batch of small QRs + SVDs: one thread is as fast alone and far faster next to other jobs (measured)
            with threads(threads_for(0) if dev.type == "cpu" else None):
                u, s, vh = factored_svd(up, down)
            del up, down
            for i, n in enumerate(chunk):
                svds[n] = (u[i, :, :cap].cpu().clone(), s[i].cpu(), vh[i, :cap].cpu().clone())
                if on_progress is not None:
                    on_progress(len(svds), len(flats), n)
            del u, s, vh

    if isinstance(rule, Budget):
        costs = {n: f.up.shape[0] + f.down.shape[1] for n, f in flats.items()}
        budget = rule.param_budget(dtypes.itemsize(out_dtype))
        ranks = allocate_budget({n: svds[n][1] for n in flats}, costs, budget, caps)
    else:
        ranks = {n: choose_rank(svds[n][1], rule, caps[n]) for n in flats}

    tensors: dict[str, torch.Tensor] = {}
    stats = []
    want = dtypes.to_torch(out_dtype)
    for name, f in flats.items():
        u, s, vh = svds[name]
        k = ranks[name]
        up, down = split_sqrt(u, s, vh, k)
        if f.conv_kind:
            up = up.reshape(up.shape[0], k, 1, 1)
            down = down.reshape(k, -1, *f.kernel)
        tensors.update(module_tensors(
            loaded.modules[name].target, "kohya", down.contiguous().to(want), up.contiguous().to(want),
            dtypes.exact_scalar(f.scale * k, out_dtype),
        ))
        stats.append(
            RankStats(name, _kind(f), int(f.up.shape[1]), k, retention(s, k), float(s[0]) * f.scale, float(s[k - 1]) * f.scale)
        )

    meta = _metadata(loaded.metadata, loaded.arch, stats, flats, rank, conv_rank, rule, path)
    written = save_adapter(out, tensors, meta, inputs=[path], force=force)
    return ResizeResult(written, loaded.arch, loaded.naming, rule.text, tuple(stats))


def _metadata(meta_in, arch, stats, flats, rank, conv_rank, rule, path) -> dict[str, str]:
    meta = {k: v for k, v in meta_in.items() if k != "modelspec.hash_sha256"}  # stale once the tensors change
    lin = [s for s in stats if s.kind != "conv3x3"]
    conv = [s for s in stats if s.kind == "conv3x3"]
    meta.setdefault("ss_network_module", NETWORK_MODULE)
    for k, v in base_model_fields(arch).items():
        meta.setdefault(k, v)
    if lin:
        fields = network_fields(dim_text(s.rank for s in lin), dim_text(round(flats[s.name].scale * s.rank, 6) for s in lin))
        meta.update({k: v for k, v in fields.items() if k != "ss_network_module"})
    if conv:
        meta["ss_network_args"] = conv_network_args(
            dim_text(s.rank for s in conv), dim_text(round(flats[s.name].scale * s.rank, 6) for s in conv),
            meta.get("ss_network_args"),
        )
    record = {
        "source": Path(path).name,
        "rank": rank,
        "conv_rank": conv_rank,
        "rule": rule.text,
        "average_retained": round(average_retained(stats), 6),
        "ranks_in": dim_text(s.rank_in for s in stats),
        "ranks_out": dim_text(s.rank for s in stats),
    }
    meta["loratool.resize"] = json.dumps(record, sort_keys=True)
    comment = f"resized by loratool from {record['ranks_in']} to {record['ranks_out']} ({record['rule']})"
    old = meta.get("ss_training_comment")
    meta["ss_training_comment"] = f"{old}; {comment}" if old and old != "None" else comment
    return meta
