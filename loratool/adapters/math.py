"""The ΔW of every adapter family, and how a module changes a weight (DoRA included).

:func:`delta` is the one formula for ``(alpha / rank) · ΔW``; :func:`apply_to_weight` the one merge
rule. LyCORIS → LoRA factor conversion (exact or tolerance-bounded SVD from the factors) is here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

from ..errors import DetectionError, MappingError
from .families import AdapterModule, scale_of


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rebuild ``W[p, r, ...] = Σ_ij core[i, j, ...] · a[i, p] · b[j, r]`` (LyCORIS Tucker form)."""
    import torch
    return torch.einsum("ij...,ip,jr->pr...", core, a, b)


def lora_delta(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled ΔW = up @ down for a LoRA / LoCon module.

    Linear: down (r,in), up (out,r) → (out,in). Conv: down (r,in,kh,kw), up (out,r,1,1) →
    ``ΔW[o,i,:,:] = Σ_r up[o,r]·down[r,i,:,:]``. Tucker (``mid`` (r,r,kh,kw), down (r,in,1,1),
    up (out,r,1,1)): ``ΔW[o,i,:,:] = Σ_ab up[o,a]·mid[a,b,:,:]·down[b,i]``.
    """
    import torch
    if mid is not None:
        u = up.reshape(up.shape[0], -1)
        d = down.reshape(down.shape[0], -1)
        return torch.einsum("ab...,oa,bi->oi...", mid, u, d)
    u = up.reshape(up.shape[0], -1)
    if down.dim() == 2:
        return u @ down
    return (u @ down.reshape(down.shape[0], -1)).reshape(u.shape[0], *down.shape[1:])


def loha_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Unscaled LoHa ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), reshaped to the weight shape.

    With Tucker cores (hada_t1/hada_t2, r,r,kh,kw), each product is rebuilt as
    ``Σ_ij t[i,j,...]·a[i,out]·b[j,in]`` (a, b stored as r,out and r,in).
    """
    if "hada_t1" in t:
        w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        return (w1 * w2).reshape(shape)
    w1 = t["hada_w1_a"] @ t["hada_w1_b"]
    w2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2).reshape(shape)


def lokr_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Unscaled LoKr ΔW = kron(w1, w2), w1 (a,c), w2 (b,d[,kh,kw]); out = a·b, in = c·d.

    w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2, lokr_w2_a @ lokr_w2_b (reshaped to
    (b, d, kh, kw) for convs), or with ``lokr_t2`` the Tucker rebuild.
    """
    import torch
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    a, c = w1.shape[0], w1.shape[1]
    b = shape[0] // a
    rest = shape[1:]
    d_total = 1
    for x in rest:
        d_total *= x
    w2 = w2.reshape(b, d_total // c)
    if len(shape) > 2:
        w2 = w2.reshape(b, shape[1] // c, *shape[2:])
        w1 = w1.reshape(a, c, *([1] * (len(shape) - 2)))
    return torch.kron(w1, w2).reshape(shape)


def swap_row_halves(x: torch.Tensor) -> torch.Tensor:
    """The two halves of ``x``'s rows exchanged (its own inverse): FLUX ``final_layer.adaLN_modulation.1`` (shift,
    scale) ↔ diffusers ``norm_out.linear`` (scale, shift), for weights, biases and LoRA ups alike."""
    import torch

    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]], dim=0)


def bias_delta(module: AdapterModule) -> torch.Tensor | None:
    """Scaled Δb of one module in float32 — a full module's ``diff_b``; a LoRA with a bias (``lora_B.bias``)
    adds ``(alpha / rank) · up_bias`` — or None when the module leaves the bias alone."""
    t = module.tensors
    if "diff_b" in t:
        return t["diff_b"].float()
    if "up_bias" in t:
        return t["up_bias"].float() * scale_of(module.family, t)
    return None


def delta(module: AdapterModule, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Scaled ΔW of one module in float32: ``(alpha / rank) · ΔW_family``, shaped like the target.

    DoRA modules (``dora_scale``) need the base weight: use :func:`apply_to_weight`.

    Args:
        module: the module's tensors by role.
        shape: the target weight's shape (defaults to the target's ``target_shape``).
    """
    t = {k: v.float() for k, v in module.tensors.items()}
    shape = tuple(shape or module.target.target_shape)
    scale = scale_of(module.family, t)
    if module.family == "lora":
        # the scale is folded into the small up factor instead of the large product
        d = lora_delta(t["down"], t["up"] * scale, t.get("mid"))
        scale = 1.0
    elif module.family == "loha":
        d = loha_delta(t, shape)
    elif module.family == "lokr":
        d = lokr_delta(t, shape)
    elif module.family == "full":
        d = t["diff"].clone()  # never hand out the module's own tensor
    else:
        raise DetectionError(f"{module.target.name}: unknown family {module.family}")
    if d.numel() != _numel(shape):
        raise MappingError(
            f"{module.target.name}: ΔW has shape {tuple(d.shape)}, target weight is {shape}",
            hint="the adapter was made for a different model",
        )
    d = d.reshape(shape)
    return d if scale == 1.0 else d * scale


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def apply_to_weight(
    weight: torch.Tensor,
    module: AdapterModule,
    ratio: float,
    delta_fn: Callable[[AdapterModule, tuple[int, ...]], torch.Tensor] = delta,
) -> torch.Tensor:
    """Return ``weight`` (float32, the module's target slice) with the module applied at ``ratio``.

    Plain families: ``W + ratio·(alpha/rank)·ΔW``.

    DoRA (``dora_scale`` m): ``W' = m · V / ‖V‖`` with ``V = W + (alpha/rank)·ΔW`` (the norm of the
    *merged* weight, as LyCORIS and PEFT compute it). The norm axis is read from m's shape:

    * (out, 1[, 1, 1]) or (out,): one norm per output row over every other axis — LyCORIS
      ``wd_on_out=True`` (its default since 2024) and PEFT's ``lora_magnitude_vector`` (out,);
    * (1, in[, 1, 1]): one norm per input channel over the output and kernel axes — older LyCORIS
      (``wd_on_out=False``).

    ``ratio`` blends the decomposed weight in: ``W + ratio·(W' − W)`` (ComfyUI's strength rule;
    ratio 1 gives W' exactly).
    """
    import torch
    w = weight.float()
    t = module.tensors
    if module.family == "lora" and "mid" not in t and not module.is_dora and delta_fn is delta:
        # same formula in one fused BLAS call, without a temporary ΔW: W + (ratio·scale·up) @ down
        up = t["up"].float().reshape(t["up"].shape[0], -1) * (ratio * scale_of("lora", t))
        down = t["down"].float().reshape(t["down"].shape[0], -1)
        if up.shape[0] * down.shape[1] == w.numel():
            return torch.addmm(w.reshape(up.shape[0], -1), up, down).reshape(w.shape)
    d = delta_fn(module, tuple(w.shape))
    if not module.is_dora:
        return torch.add(w, d, alpha=ratio)
    m = module.tensors["dora_scale"].float()
    merged = w + d
    if m.shape[0] == merged.shape[0] and (m.dim() < 2 or m.shape[1] == 1):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (merged.dim() - 1)))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *([1] * (merged.dim() - 2)))
    m = m.reshape(norm.shape)
    dora = merged * (m / (norm + torch.finfo(torch.float32).eps))
    return w + ratio * (dora - w)


def delta_norm_sq(module: AdapterModule, shape: tuple[int, ...]) -> float:
    """``‖(alpha/rank)·ΔW‖²_F`` of one module, without the dense ΔW where a closed form exists.

    LoRA (no Tucker mid): with U = up (out, r) and D = down (r, in·k·k),
    ``‖U·D‖²_F = Σ_ij (UᵀU)_ij · (D·Dᵀ)_ij`` — two r×r Gram matrices.
    LoKr: ``‖kron(w1, w2)‖_F = ‖w1‖_F · ‖w2‖_F``. Every other family: the dense
    :func:`loratool.adapters.delta`. Computed in float64.
    """
    t = module.tensors
    scale = scale_of(module.family, t)
    if module.family == "lora" and "mid" not in t:
        u = t["up"].double().reshape(t["up"].shape[0], -1)
        d = t["down"].double().reshape(t["down"].shape[0], -1)
        if u.shape[1] == d.shape[0] and u.shape[0] * d.shape[1] == _numel(shape):
            return float(((u.T @ u) * (d @ d.T)).sum()) * scale * scale
    if module.family == "lokr" and "lokr_t2" not in t:
        w1 = t["lokr_w1"].double() if "lokr_w1" in t else t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()
        w2 = t["lokr_w2"].double() if "lokr_w2" in t else t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
        if w1.numel() * w2.numel() == _numel(shape):
            return float(w1.pow(2).sum() * w2.pow(2).sum()) * scale * scale
    return float(delta(module, shape).double().pow(2).sum())


DEFAULT_REL_TOL = 1e-4


def module_shape(module: AdapterModule) -> tuple[int, ...]:
    """Shape of the ΔW a module makes, read from its own tensors (it equals the target's shape in the
    file's config; reading it off the factors keeps this function free of the tables).

    Conv kernels come from the target weight (a kernel size is a constant of the layer).
    """
    t = module.tensors
    target = module.target.target_shape
    kernel = tuple(target[2:]) if len(target) == 4 else ()
    k = math.prod(kernel) if kernel else 1
    fam = module.family
    if fam == "lora":
        down, up = t["down"], t["up"]
        if "mid" in t:
            return (up.shape[0], down.shape[1], *t["mid"].shape[2:])
        if down.dim() == 4:
            return (up.shape[0], *down.shape[1:]) if kernel or down.shape[2:] != (1, 1) else (up.shape[0], down.shape[1])
        return (up.shape[0], down.shape[1])
    if fam == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        out, flat = t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
    elif fam == "lokr":
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            b, rest = w2.shape[0], math.prod(w2.shape[1:])
        elif "lokr_t2" in t:
            b, rest = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * math.prod(t["lokr_t2"].shape[2:])
        else:
            b, rest = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1]
        out, flat = w1[0] * b, w1[1] * rest
    elif fam == "full":
        return tuple(t["diff"].shape)
    else:
        raise MappingError(f"{module.target.name}: unknown adapter family {fam!r}")
    if kernel and flat % k == 0:
        return (out, flat // k, *kernel)
    return (out, flat)


def _khatri_rao_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: ``K[i, p·r2 + q] = a1[i, p] · a2[i, q]``."""
    return (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(a1.shape[0], -1)


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices: ``K[i·p + j, k·q + l] = a[i, k] · b[j, l]`` (b is p×q)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _svd_of(module: AdapterModule, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``U S Vh`` of the module's *unscaled* ΔW flattened to (out, in·kh·kw).

    LoHa: ``(A1 B1) ⊙ (A2 B2) = K L`` with ``K = A1 ⊙ᵣ A2`` (out, r1·r2, row-wise Kronecker) and
    ``L[p·r2+q] = B1[p] ⊙ B2[q]`` (r1·r2, in), so rank ≤ r1·r2 and the SVD comes from the factors.
    LoKr: ``kron(W1, W2) = kron(U1, U2) kron(S1, S2) kron(V1, V2)ᵀ``, rank = rank(W1)·rank(W2).
    Anything else (Tucker cores, full diffs, DoRA-free LoRA with too high a rank) is SVD'd densely.
    """
    import torch

    from ..ops.lowrank import factored_svd

    t = {k: v.float() for k, v in module.tensors.items() if k not in ("alpha", "dora_scale")}
    out = shape[0]
    fam = module.family
    if fam == "loha" and "hada_t1" not in t:
        k = _khatri_rao_rows(t["hada_w1_a"], t["hada_w2_a"])
        b1, b2 = t["hada_w1_b"], t["hada_w2_b"]
        left = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])
        return factored_svd(k, left)
    if fam == "lora" and "mid" not in t:
        return factored_svd(t["up"].reshape(out, -1), t["down"].reshape(t["down"].shape[0], -1))
    if fam == "lokr" and "lokr_t2" not in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        w2 = w2.reshape(w2.shape[0], -1)
        u1, s1, vh1 = torch.linalg.svd(w1, full_matrices=False)
        u2, s2, vh2 = torch.linalg.svd(w2, full_matrices=False)
        s = (s1[:, None] * s2[None, :]).reshape(-1)
        order = torch.argsort(s, descending=True)
        return _kron(u1, u2)[:, order], s[order], _kron(vh1, vh2)[order]
    dense = delta(AdapterModule(module.target, fam, {k: v for k, v in module.tensors.items() if k != "alpha"}), shape)
    return torch.linalg.svd(dense.reshape(out, -1), full_matrices=False)


class LoraFactors(NamedTuple):
    """Plain LoRA factors of a module and the relative error they make (:func:`to_lora_factors`)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rel_error: float


def to_lora_factors(
    module: AdapterModule,
    max_rank: int | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
    shape: tuple[int, ...] | None = None,
) -> LoraFactors:
    """Plain LoRA factors (down, up, alpha) for any adapter module, with the relative error made.

    * LoRA without ``mid``, rank ≤ ``max_rank``: the module's own factors and alpha (error 0).
    * LoCon with ``mid`` (Tucker): ``down'[a,i,:,:] = Σ_b mid[a,b,:,:]·down[b,i]`` (exact, rank kept).
    * LoHa, LoKr, full diffs, or any LoRA above ``max_rank``: exact SVD ``ΔW = U S Vh`` (from the
      factors, see :func:`_svd_of`), truncated at the smallest rank k whose dropped tail satisfies
      ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{j>k} s_j²) / sqrt(Σ s_j²) ≤ rel_tol`` (and k ≤ ``max_rank``).
      ``up = U_k·sqrt(S_k)``, ``down = sqrt(S_k)·Vh_k``, ``alpha = k`` (scale 1), so
      ``up @ down = (alpha_in/r_in)·ΔW_k`` — the input's scale is folded into the factors.

    Args:
        module: an adapter module (``dora_scale`` is ignored here: ΔW is preserved, so the caller
            may carry the DoRA magnitude over unchanged).
        max_rank: cap on the output rank (None: only the tolerance decides).
        rel_tol: relative Frobenius tolerance for dropping singular values.
        shape: ΔW shape; defaults to :func:`module_shape`.

    Returns:
        ``(down, up, alpha, rel_error)`` in float32 — down ``(k, in)`` / up ``(out, k)`` for 2-D ΔW,
        down ``(k, in, kh, kw)`` / up ``(out, k, 1, 1)`` for conv ΔW; ``rel_error`` is the relative
        Frobenius error of the returned factors against the module's scaled ΔW.

    Example:
        >>> import torch
        >>> from loratool.arch import ModuleTarget
        >>> tgt = ModuleTarget("m", "linear", "w", None, (8, 6), "unet/w.weight")
        >>> g = torch.Generator().manual_seed(0)
        >>> t = {k: torch.randn(*s, generator=g) for k, s in
        ...      {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 2), "hada_w2_b": (2, 6)}.items()}
        >>> down, up, alpha, err = to_lora_factors(AdapterModule(tgt, "loha", t))
        >>> down.shape[0] <= 4 and err < 1e-4
        True
    """
    import torch

    shape = tuple(shape or module_shape(module))
    t = {k: v.float() for k, v in module.tensors.items()}
    fam = module.family
    if fam == "lora":
        r = t["down"].shape[0]
        alpha = module.alpha if module.alpha is not None else float(r)
        if max_rank is None or r <= max_rank:
            down = t["down"]
            if "mid" in t:
                mid = t["mid"]
                down = torch.einsum("ab...,bi->ai...", mid, down.reshape(r, -1))
            return LoraFactors(*_shaped(down, t["up"], shape), alpha, 0.0)
    u, s, vh = _svd_of(module, shape)
    scale = scale_of(fam, t)
    s = s * abs(scale)
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        k = 1
        err = 0.0
    else:
        tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])  # tail[j] = Σ_{i≥j} s_i²
        tail = torch.cat([tail[1:], tail.new_zeros(1)])  # energy dropped when keeping j+1 values
        ok = (tail / total) <= rel_tol**2
        k = int(torch.nonzero(ok)[0]) + 1 if bool(ok.any()) else s.numel()
        if max_rank is not None:
            k = max(1, min(k, max_rank))
        err = math.sqrt(max(0.0, float(tail[k - 1]) / total))
    root = s[:k].sqrt()
    up = u[:, :k] * root * (1.0 if scale >= 0 else -1.0)
    down = root[:, None] * vh[:k]
    return LoraFactors(*_shaped(down, up, shape), float(k), err)


def _shaped(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    k = down.shape[0]
    if len(shape) == 4:
        return down.reshape(k, *shape[1:]), up.reshape(shape[0], k, 1, 1)
    return down.reshape(k, -1), up.reshape(shape[0], k)
