"""Low-rank linear algebra shared by resize, extract and LoRA+LoRA merges. Pure tensor functions.

Rank rules (parsed from the CLI by :func:`parse_rule`) decide how many singular values a module keeps:

    fixed            keep ``max_rank``
    sv_ratio:X       keep every σᵢ ≥ σ₀ / X
    sv_fro:X         smallest k with ‖σ[:k]‖² / ‖σ‖² ≥ X²   (X = share of the Frobenius norm kept)
    sv_cumulative:X  smallest k with Σσ[:k] / Σσ ≥ X
    size:MB          one budget for the whole file (10⁶ bytes per MB), shared across modules
    params:N         the same budget counted in parameters

Every rule keeps at least 1 and at most ``max_rank`` (and the number of singular values).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import LoratoolError

# Boundary cases (a ratio that lands exactly on the target) must count as reached even when
# float rounding puts the computed ratio a hair below it.
_REL_TOL = 1e-9


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``up @ down`` without forming the dense product.

    ``up`` (out, r), ``down`` (r, in). With ``up = Qu Ru`` and ``downᵀ = Qd Rd``,
    ``up @ down = Qu (Ru Rdᵀ) Qdᵀ``; the SVD of the small r×r core ``Ru Rdᵀ = Uc S Vcᵀ`` gives
    ``U = Qu Uc``, ``Vh = Vcᵀ Qdᵀ``. Cost O((out + in)·r²) instead of O(out·in·min(out, in)).
    Leading batch dimensions are allowed (``up`` (b, out, r), ``down`` (b, r, in)).

    Returns:
        (U (out, k), S (k,), Vh (k, in)) with k = min(r, out, in), S descending, in float32
        (float64 inputs stay float64).

    Example:
        >>> u, d = torch.randn(6, 2), torch.randn(2, 5)
        >>> U, S, Vh = factored_svd(u, d)
        >>> torch.allclose(U @ torch.diag(S) @ Vh, u @ d, atol=1e-5)
        True
    """
    dt = torch.float64 if up.dtype == torch.float64 else torch.float32
    up = up.to(dt)
    down = down.to(dt)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.mT)
    uc, s, vch = torch.linalg.svd(ru @ rd.mT, full_matrices=False)
    return qu @ uc, s, vch @ qd.mT


def randomized_svd(
    a: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` SVD of ``a`` (m, n) by randomized range finding (Halko et al. 2011).

    ``Y = (A Aᵀ)^q A Ω`` with Ω (n, rank + oversample) Gaussian from ``seed`` (drawn on the CPU, so
    the result is the same on every device), re-orthonormalised by QR after every product;
    ``B = Qᵀ A`` is small and its exact SVD gives ``U = Q U_B``. When ``rank + oversample`` reaches
    min(m, n) the exact SVD is used instead.

    Returns:
        (U (m, k), S (k,), Vh (k, n)) with k = min(rank, m, n), float32 (float64 stays float64).
    """
    m, n = a.shape
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.to(dt)
    k = min(rank, m, n)
    p = min(k + oversample, m, n)
    if p >= min(m, n):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, p, generator=gen, dtype=dt).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def seed_for(name: str, seed: int = 0) -> int:
    """A per-module seed from the module name, so results do not depend on processing order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors with √σ on both sides: ``up = U[:, :k]·diag(√σ)``, ``down = diag(√σ)·Vh[:k]``.

    ``up @ down = U_k diag(σ_k) Vh_k``, the best rank-k approximation (Eckart–Young). Splitting √σ
    evenly keeps both factors at the same magnitude, which fp16 storage needs.
    """
    r = s[:k].clamp_min(0).sqrt()
    return u[..., :, :k] * r.unsqueeze(-2), r.unsqueeze(-1) * vh[..., :k, :]


def retention(s: torch.Tensor, k: int, total_sq: float | None = None) -> float:
    """Share of the Frobenius norm kept by the first k singular values: ``‖σ[:k]‖ / ‖σ‖`` (1 for σ = 0).

    ``total_sq`` is ‖ΔW‖²_F when ``s`` holds only the leading singular values (randomized SVD).
    """
    s2 = s.double().cpu().pow(2)
    total = float(s2.sum()) if total_sq is None else max(float(total_sq), float(s2.sum()))
    if total == 0.0:
        return 1.0
    return float(s2[:k].sum() / total) ** 0.5


def clamp_quantile(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ±h, h the ``q``-quantile of their pooled absolute values.

    The quantile is the ⌈q·n⌉-th smallest |value| found with ``kthvalue`` on the flattened
    tensor (no size limit, unlike ``torch.quantile``).
    """
    if not 0.0 < q <= 1.0:
        raise LoratoolError(f"--clamp-quantile {q} is outside (0, 1]", hint="e.g. --clamp-quantile 0.99")
    pooled = torch.cat([up.reshape(-1), down.reshape(-1)]).abs().float().cpu()
    kth = max(1, min(pooled.numel(), int(-(-q * pooled.numel() // 1))))
    h = float(pooled.kthvalue(kth).values)
    return up.clamp(-h, h), down.clamp(-h, h)


# ----------------------------------------------------------------------------- rank rules


@dataclass(frozen=True)
class FixedRank:
    """Keep ``max_rank`` (or every singular value when there are fewer)."""

    text = "fixed"


@dataclass(frozen=True)
class SvRatio:
    """Keep σᵢ ≥ σ₀ / ratio (kohya's ``sv_ratio`` keeps σᵢ > σ₀ / ratio, strictly)."""

    ratio: float

    @property
    def text(self) -> str:
        return f"sv_ratio:{self.ratio:g}"


@dataclass(frozen=True)
class SvFro:
    """Smallest k with ‖σ[:k]‖² / ‖σ‖² ≥ target² (kohya's ``sv_fro`` definition)."""

    target: float

    @property
    def text(self) -> str:
        return f"sv_fro:{self.target:g}"


@dataclass(frozen=True)
class SvCumulative:
    """Smallest k with Σσ[:k] / Σσ ≥ target (kohya's ``sv_cumulative`` definition)."""

    target: float

    @property
    def text(self) -> str:
        return f"sv_cumulative:{self.target:g}"


@dataclass(frozen=True)
class Budget:
    """A global budget: ``params`` parameters over all modules, or ``megabytes`` of tensor data."""

    params: int | None = None
    megabytes: float | None = None

    @property
    def text(self) -> str:
        return f"size:{self.megabytes:g}" if self.megabytes is not None else f"params:{self.params}"

    def param_budget(self, bytes_per_param: int) -> int:
        if self.params is not None:
            return self.params
        return int(self.megabytes * 1_000_000 // bytes_per_param)


FIXED = FixedRank()
RankRule = FixedRank | SvRatio | SvFro | SvCumulative | Budget

_RULE_HINT = "use fixed, sv_ratio:X (X ≥ 1), sv_fro:X or sv_cumulative:X (0 < X ≤ 1), size:MB or params:N"


def parse_rule(text: str) -> RankRule:
    """``"sv_fro:0.9"`` → :class:`SvFro` (0.9); raises :class:`LoratoolError` with the valid forms."""
    name, _, value = text.strip().partition(":")
    name = name.lower()
    if name == "fixed" and not value:
        return FixedRank()
    try:
        x = float(value)
    except ValueError:
        raise LoratoolError(f"unknown rank rule {text!r}", hint=_RULE_HINT) from None
    if name == "sv_ratio" and x >= 1:
        return SvRatio(x)
    if name == "sv_fro" and 0 < x <= 1:
        return SvFro(x)
    if name == "sv_cumulative" and 0 < x <= 1:
        return SvCumulative(x)
    if name == "size" and x > 0:
        return Budget(megabytes=x)
    if name == "params" and x >= 1 and x == int(x):
        return Budget(params=int(x))
    raise LoratoolError(f"bad rank rule {text!r}", hint=_RULE_HINT)


def _smallest_reaching(fractions: torch.Tensor, target: float) -> int:
    """1 + first index i with fractions[i] ≥ target (fractions non-decreasing, ending at 1)."""
    hit = (fractions >= target - _REL_TOL).nonzero()
    return int(hit[0]) + 1 if len(hit) else len(fractions)


def choose_rank(s: torch.Tensor, rule: RankRule, max_rank: int, total_sq: float | None = None) -> int:
    """The rank a per-module rule keeps for singular values ``s`` (descending), in [1, min(max_rank, len(s))].

    A :class:`Budget` is global; per module it means "up to ``max_rank``" (see :func:`allocate_budget`).
    ``total_sq`` (‖ΔW‖²_F) lets ``sv_fro`` work on a truncated spectrum; ``sv_cumulative`` needs
    the whole spectrum (Σσ is not known from the leading values).
    """
    n = int(s.numel())
    cap = max(1, min(max_rank, n))
    if n == 0:
        return 1
    s = s.double().cpu()
    if isinstance(rule, (FixedRank, Budget)):
        return cap
    if float(s[0]) == 0.0:
        return 1
    if isinstance(rule, SvRatio):
        k = int((s >= s[0] / rule.ratio * (1 - _REL_TOL)).sum())
    elif isinstance(rule, SvFro):
        s2 = s.pow(2)
        total = float(s2.sum()) if total_sq is None else max(float(total_sq), float(s2.sum()))
        k = _smallest_reaching(s2.cumsum(0) / total, rule.target**2)
    elif isinstance(rule, SvCumulative):
        k = _smallest_reaching(s.cumsum(0) / s.sum(), rule.target)
    else:  # pragma: no cover - exhaustive
        raise TypeError(rule)
    return max(1, min(k, cap))


def allocate_budget(
    spectra: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int, caps: Mapping[str, int]
) -> dict[str, int]:
    """Ranks for every module under one parameter budget, greedily by σ² per parameter.

    Every module keeps rank 1 first (so the file keeps its module set). Then singular values of
    all modules are taken in order of ``σ² / cost`` (cost = parameters one more rank costs:
    out + in·kh·kw), each module's in its own descending order, while they fit in the budget and
    the module's cap (``--rank`` / ``--conv-rank``). σ² is the squared Frobenius norm a rank adds,
    so this maximises the retained energy per stored parameter.

    Args:
        spectra: module → singular values (descending).
        costs: module → parameters per rank.
        budget: total parameters allowed (factors only).
        caps: module → largest rank allowed.
    """
    ranks = {name: 1 for name in spectra}
    left = budget - sum(costs[name] for name in spectra)
    candidates = []
    for name, s in spectra.items():
        s2 = s.double().cpu().pow(2)
        cap = min(caps[name], int(s.numel()))
        for i in range(1, cap):
            candidates.append((-float(s2[i]) / costs[name], name, i))
    candidates.sort()
    stopped: set[str] = set()
    for _, name, i in candidates:
        if name in stopped or i != ranks[name]:
            continue
        if costs[name] > left:
            stopped.add(name)
            continue
        ranks[name] = i + 1
        left -= costs[name]
    return ranks


# ----------------------------------------------------------------------------- shared by resize / extract


@dataclass(frozen=True)
class RankStats:
    """What happened to one module.

    Attributes:
        name: kohya module name.
        kind: ``linear``, ``conv1x1`` or ``conv3x3``.
        rank_in: the input rank (resize), or None (extract).
        rank: the rank written.
        retained: ‖ΔW_k‖_F / ‖ΔW‖_F, the share of the module's Frobenius norm kept.
        sv_max: largest singular value of ΔW (scaled, as applied).
        sv_last: smallest singular value kept.
    """

    name: str
    kind: str
    rank_in: int | None
    rank: int
    retained: float
    sv_max: float
    sv_last: float


def average_retained(stats) -> float:
    """Mean of the per-module Frobenius retention (1.0 for no modules)."""
    stats = list(stats)
    return sum(s.retained for s in stats) / len(stats) if stats else 1.0
