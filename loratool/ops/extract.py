"""Extract a LoRA from a fine-tune: ΔW = tuned − base per kohya module, truncated SVD, √σ split.

Both checkpoints are read one weight pair at a time (a fused q/k/v tensor is read once per slice
it feeds). ΔW is flattened to (out, in·kh·kw); its leading singular triplets come from a seeded
randomized SVD (default) or the exact SVD (``exact=True``). Output factors are ``up = U_k √Σ_k``,
``down = √Σ_k V_kᵀ`` with alpha = k (scale 1), kohya's extraction convention.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import dtypes
from ..adapters.io import module_tensors, save_adapter
from ..adapters.math import swap_row_halves
from ..arch import ARCH_LABELS, DENOISERS, ModuleTarget, kohya_modules
from ..arch.sd_checkpoint import solve_config
from ..arch.sd_naming import all_modules
from ..detect import detect_checkpoint
from ..errors import LoratoolError, MappingError, listing
from ..io.source import TensorSource, open_file
from ..io.writer import check_output, container_for
from ..metadata.kohya import base_model_fields, conv_network_args, dim_text, modelspec_fields, network_fields
from ..progress import Progress
from ..runtime import SMALL_FACTORIZATION, resolve_device, threads, threads_for
from .lowrank import (
    FIXED,
    Budget,
    RankRule,
    RankStats,
    SvCumulative,
    allocate_budget,
    average_retained,
    choose_rank,
    clamp_quantile,
    randomized_svd,
    retention,
    seed_for,
    split_sqrt,
)


@dataclass(frozen=True)
class ExtractResult:
    """The written file, one :class:`RankStats` per extracted module, and what was skipped."""

    path: Path
    arch: str
    rule: str
    exact: bool
    modules: tuple[RankStats, ...]
    skipped: tuple[str, ...]  # ΔW max |·| ≤ min_diff
    conv_skipped: int  # 3x3 convs left out (no conv rank)
    text_encoder_unchanged: bool

    @property
    def average_retained(self) -> float:
        return average_retained(self.modules)


@dataclass(frozen=True)
class _Pending:
    target: ModuleTarget
    kind: str
    kernel: tuple[int, ...]
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_sq: float


class _OneTensorCache:
    """Keeps the last tensor read, so the three row slices of a fused q/k/v weight cost one read."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.key: str | None = None
        self.value: torch.Tensor | None = None

    def get(self, key: str) -> torch.Tensor:
        if key != self.key:
            self.key, self.value = key, self.source.get(key)
        return self.value


def _key(target: ModuleTarget, naming: str) -> str:
    return target.address if naming == "ldm" else target.diffusers_key


def _rows(tensor: torch.Tensor, target: ModuleTarget, naming: str) -> torch.Tensor:
    """The module's rows of a fused single-file weight (``target`` sized to the file's config); a diffusers
    folder stores q, k and v apart, so its tensor is the module's weight as it is — except FLUX's norm_out,
    whose halves diffusers stores swapped against the BFL order its kohya module uses."""
    if naming != "ldm":
        from ..arch.flux_naming import BFL_ORDER_KOHYA_NAME

        return swap_row_halves(tensor) if target.name == BFL_ORDER_KOHYA_NAME else tensor
    if target.rows is None:
        return tensor
    return tensor[target.rows[0]: target.rows[1]]


def plan_targets(arch: str, all_layers: bool, with_conv: bool) -> tuple[list[ModuleTarget], int]:
    """Targets to extract, and how many 3x3 convs were left out because no conv rank was given.

    FLUX.1: the transformer's kohya modules (the fused ``img_attn.qkv``, ``linear1``... as sd-scripts'
    ``flux_extract_lora.py`` extracts them); its text encoders are separate files.
    """
    if arch == "flux1":
        table = {n: t for n, t in kohya_modules(arch).items() if t.component == "transformer"}
        if all_layers:  # + the embedders, final_layer.linear and norm_out (named by its BFL tensor, BFL row order)
            from ..arch.flux_naming import BFL_ORDER_KOHYA_NAME, extra_kohya_modules, split_modules
            from ..arch.flux_naming import SWAPPED_HALVES as swapped

            table.update(extra_kohya_modules())
            norm_out = next(t for t in split_modules().values() if t.diffusers_key in swapped)
            table[BFL_ORDER_KOHYA_NAME] = replace(norm_out, name=BFL_ORDER_KOHYA_NAME)
        return sorted(table.values(), key=lambda t: t.name), 0
    table = all_modules(arch) if all_layers else kohya_modules(arch)
    keep = [t for t in table.values() if with_conv or t.kind != "conv3x3"]
    return sorted(keep, key=lambda t: t.name), len(table) - len(keep)


def extract_lora(
    tuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    rank: int,
    conv_rank: int | None = None,
    rule: RankRule = FIXED,
    clamp: float | None = None,
    min_diff: float = 0.0,
    exact: bool = False,
    all_layers: bool = False,
    device: str = "auto",
    arch: str | None = None,
    dtype: str = "F16",
    force: bool = False,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> ExtractResult:
    """Write a kohya LoRA approximating ``tuned − base``.

    Args:
        rank: rank (fixed rule) or largest rank (dynamic rules, budgets) of linear / 1x1 modules.
        conv_rank: rank of 3x3 conv modules; None leaves them out (kohya's default).
        rule: :class:`FixedRank`, a per-module rule or a :class:`Budget` (``sv_cumulative`` forces exact SVDs).
        clamp: clamp factor values to this quantile of their magnitudes (off by default).
        min_diff: modules whose max |ΔW| ≤ min_diff are skipped (default 0: identical weights).
        exact: full SVD instead of randomized.
        all_layers: every adaptable Linear/Conv (``arch.sd_naming.all_modules``), not just kohya's network.
        on_progress: ``(done, total, module name)`` after each module (:mod:`loratool.progress`).

    Raises:
        LoratoolError: rank < 1, arch or shape mismatch between the two files, unusable output.
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise LoratoolError(f"rank must be at least 1 (got {rank if rank < 1 else conv_rank})", hint="e.g. --rank 32")
    tuned, base = Path(tuned), Path(base)
    container_for(out)
    check_output(Path(out), [tuned, base], force)
    dev = resolve_device(device)
    exact = exact or isinstance(rule, SvCumulative)
    with open_file(tuned) as ts, open_file(base) as bs:
        bspecs, tspecs = bs.specs(), ts.specs()
        bm = detect_checkpoint(bspecs, arch)
        tm = detect_checkpoint(tspecs, arch)
        if arch is None and tm.arch != bm.arch:
            raise MappingError(
                f"{tuned.name} is {ARCH_LABELS[tm.arch]} but {base.name} is {ARCH_LABELS[bm.arch]}",
                hint="extract against the base model the fine-tune started from",
            )
        arch = bm.arch
        targets, conv_left = plan_targets(arch, all_layers, conv_rank is not None)
        config = solve_config(arch, bspecs, bm.naming)
        targets = [t.sized(config) for t in targets]
        if arch == "flux1" and all_layers:  # schnell has no guidance_in: a layer neither file has is not extracted
            targets = [t for t in targets if _key(t, tm.naming) in tspecs or _key(t, bm.naming) in bspecs]
        _check_pairs(targets, tspecs, tm.naming, tuned, bspecs, bm.naming, base)
        tcache, bcache = _OneTensorCache(ts), _OneTensorCache(bs)
        pending: list[_Pending] = []
        skipped: list[str] = []
        for target in targets:
            w_t = _rows(tcache.get(_key(target, tm.naming)), target, tm.naming)
            w_b = _rows(bcache.get(_key(target, bm.naming)), target, bm.naming)
            kind = target.kind
            cap = conv_rank if kind == "conv3x3" else rank
            work = w_t.numel() * (w_t.shape[0] if exact else (cap or 1) + oversample) * (1 if exact else 2 * n_iter + 2)
            with threads(threads_for(work, SMALL_FACTORIZATION) if dev.type == "cpu" else None):
                pending_one = _extract_one(target, w_t, w_b, dev, kind, cap, exact, rule, oversample, n_iter, seed, min_diff)
            if pending_one is None:
                skipped.append(target.name)
            else:
                pending.append(pending_one)
            if on_progress is not None:
                on_progress(len(pending) + len(skipped), len(targets), target.name)

    caps = {p.target.name: (conv_rank if p.kind == "conv3x3" else rank) for p in pending}

    if isinstance(rule, Budget):
        costs = {p.target.name: p.u.shape[0] + p.vh.shape[1] for p in pending}
        ranks = allocate_budget({p.target.name: p.s for p in pending}, costs, rule.param_budget(dtypes.itemsize(dtype)), caps)
    else:
        ranks = {p.target.name: choose_rank(p.s, rule, caps[p.target.name], p.total_sq) for p in pending}

    want = dtypes.to_torch(dtype)
    tensors: dict[str, torch.Tensor] = {}
    stats = []
    for p in pending:
        name, k = p.target.name, ranks[p.target.name]
        up, down = split_sqrt(p.u, p.s, p.vh, k)
        if clamp is not None:
            up, down = clamp_quantile(up, down, clamp)
        if p.kernel:
            up = up.reshape(up.shape[0], k, 1, 1)
            down = down.reshape(k, -1, *p.kernel)
        tensors.update(module_tensors(
            p.target, "kohya", down.contiguous().to(want), up.contiguous().to(want), dtypes.exact_scalar(float(k), dtype)
        ))
        stats.append(RankStats(name, p.kind, None, k, retention(p.s, k, p.total_sq), float(p.s[0]), float(p.s[k - 1])))
    if not tensors:
        raise LoratoolError(
            f"{tuned.name} and {base.name} do not differ in any extracted module (min diff {min_diff:g})",
            hint="is the first file really a fine-tune of the second? lower --min-diff",
        )
    te = [t.name for t in targets if t.component not in DENOISERS]
    te_unchanged = bool(te) and set(te) <= set(skipped)
    meta = _metadata(arch, stats, rank, conv_rank, rule, exact, tuned, base)
    written = save_adapter(out, tensors, meta, inputs=[tuned, base], force=force)
    return ExtractResult(written, arch, rule.text, exact, tuple(stats), tuple(skipped), conv_left, te_unchanged)


def _extract_one(target, w_t, w_b, dev, kind, cap, exact, rule, oversample, n_iter, seed, min_diff):
    """The SVD of one module's ΔW = tuned − base (None when it is unchanged)."""
    d = w_t.to(dev, torch.float32) - w_b.to(dev, torch.float32)
    kernel = tuple(d.shape[2:]) if d.dim() == 4 else ((1, 1) if kind != "linear" else ())
    d = d.reshape(d.shape[0], -1)
    if d.numel() == 0 or float(d.abs().max()) <= min_diff:
        return None
    if exact:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        if not isinstance(rule, SvCumulative):  # Σσ needs every σ; other rules need ≤ cap
            u, s, vh = u[:, :cap], s[:cap], vh[:cap]
    else:
        u, s, vh = randomized_svd(d, cap, oversample, n_iter, seed_for(target.name, seed))
    total = float(torch.linalg.vector_norm(d)) ** 2
    return _Pending(target, kind, kernel, u.cpu(), s.cpu(), vh.cpu(), total)


def _check_pairs(targets, tspecs, tnaming, tuned: Path, bspecs, bnaming, base: Path) -> None:
    """Every target weight exists in both files with the same shape (checked from headers only)."""
    missing, differ = [], []
    for t in targets:
        kt, kb = _key(t, tnaming), _key(t, bnaming)
        if kt not in tspecs or kb not in bspecs:
            missing.append(kt if kt not in tspecs else kb)
        elif tuple(tspecs[kt].shape) != tuple(bspecs[kb].shape):
            differ.append(f"{kb} {tuple(tspecs[kt].shape)} vs {tuple(bspecs[kb].shape)}")
    if differ:
        raise MappingError(
            f"{tuned.name} and {base.name} differ in shape at {len(differ)} weights: {listing(differ, 3)}",
            hint="the two files are not the same model architecture; extract against the right base",
        )
    if missing:
        raise MappingError(
            f"{len(missing)} weights to extract are missing: {listing(sorted(set(missing)), 3)}",
            hint="both files must be full checkpoints of the same architecture (pass --arch to force one)",
        )


def _metadata(arch, stats, rank, conv_rank, rule, exact, tuned: Path, base: Path) -> dict[str, str]:
    lin = [s for s in stats if s.kind != "conv3x3"]
    conv = [s for s in stats if s.kind == "conv3x3"]
    dim = dim_text(s.rank for s in lin) if lin else str(rank)
    meta = {
        **network_fields(dim, dim),
        **base_model_fields(arch),
        "ss_sd_model_name": base.name,
        "ss_training_comment": f"extracted by loratool from {tuned.name} - {base.name}",
        **modelspec_fields(arch, tuned.stem),
    }
    if conv:
        meta["ss_network_args"] = conv_network_args(dim_text(s.rank for s in conv), dim_text(s.rank for s in conv))
    meta["loratool.extract"] = json.dumps(
        {
            "tuned": tuned.name,
            "base": base.name,
            "rank": rank,
            "conv_rank": conv_rank,
            "rule": rule.text,
            "svd": "exact" if exact else "randomized",
            "average_retained": round(average_retained(stats), 6),
        },
        sort_keys=True,
    )
    return meta
