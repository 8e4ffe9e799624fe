"""Reference ΔW formulas written out for the tests, independently of loratool.adapters.

Each follows the family's published definition (kohya LoRA/LoCon, LyCORIS LoHa/LoKr/Tucker, DoRA);
tests compare loratool's merges with these, never with loratool's own math.
"""

from __future__ import annotations

import torch


def _scale(t: dict, rank: int | None) -> float:
    if rank is None or "alpha" not in t:
        return 1.0
    return float(t["alpha"].double()) / rank


def _tucker(core, a, b):
    # W[p, q, h, w] = Σ_ij core[i, j, h, w] · a[i, p] · b[j, q]  (a: r×out, b: r×in)
    return torch.einsum("ijhw,ip,jq->pqhw", core, a, b)


def family_delta(roles: dict, shape: tuple[int, ...]) -> torch.Tensor:
    """Scaled ΔW = (alpha/rank)·ΔW_family of one module (float64), shaped like the target."""
    t = {k: v.double() for k, v in roles.items()}
    out = shape[0]
    if "down" in t:  # LoRA / LoCon
        r = t["down"].shape[0]
        up = t["up"].reshape(out, r)
        if "mid" in t:
            d = torch.einsum("oa,abhw,bi->oihw", up, t["mid"], t["down"].reshape(r, -1))
        else:
            d = up @ t["down"].reshape(r, -1)
        return (_scale(t, r) * d).reshape(shape)
    if "hada_w1_a" in t:  # LoHa: (w1a w1b) ⊙ (w2a w2b)
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (_scale(t, t["hada_w1_b"].shape[0]) * (w1 * w2)).reshape(shape)
    if any(k.startswith("lokr_") for k in t):  # LoKr: kron(w1, w2)
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            rank = t["lokr_w2_b"].shape[0]
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            rank = t["lokr_w2_b"].shape[0]
        a, c = w1.shape
        b = out // a
        inner = 1
        for s in shape[1:]:
            inner *= s
        w2 = w2.reshape(b, inner // c)
        d = (w1[:, None, :, None] * w2[None, :, None, :]).reshape(out, inner)  # Kronecker product, written out
        if len(shape) == 4:  # conv: kron over (out, in) with the kernel carried inside w2
            kh, kw = shape[2], shape[3]
            w2k = w2.reshape(b, shape[1] // c, kh, kw)
            d = (w1[:, None, :, None, None, None] * w2k[None, :, None, :, :, :]).reshape(shape)
        return (_scale(t, rank) * d).reshape(shape)
    if "diff" in t:
        return t["diff"].reshape(shape)
    raise ValueError(f"unknown family: {sorted(t)}")


def merged_weight(w: torch.Tensor, roles: dict, ratio: float) -> torch.Tensor:
    """W + ratio·(alpha/rank)·ΔW; DoRA: W + ratio·(m·V/‖V‖ − W) with V = W + (alpha/rank)·ΔW, the norm per
    output row for a (out, 1, …) magnitude and per input column for a (1, in, …) one."""
    w = w.double()
    d = family_delta(roles, tuple(w.shape))
    if "dora_scale" not in roles:
        return w + ratio * d
    v = w + d
    m = roles["dora_scale"].double()
    if m.shape[0] == v.shape[0] and (m.dim() < 2 or m.shape[1] == 1):
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(1, -1, *([1] * (v.dim() - 2)))
    return w + ratio * (m.reshape(norm.shape) * v / norm - w)
