"""Low-rank linear algebra shared by resize, extract and LoRA+LoRA merges. Pure tensor functions."""

from __future__ import annotations

import torch


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``up @ down`` without forming the dense product.

    ``up`` (out, r), ``down`` (r, in). With ``up = Qu Ru`` and ``downᵀ = Qd Rd``,
    ``up @ down = Qu (Ru Rdᵀ) Qdᵀ``; the SVD of the small r×r core ``Ru Rdᵀ = Uc S Vcᵀ`` gives
    ``U = Qu Uc``, ``Vh = Vcᵀ Qdᵀ``. Cost O((out + in)·r²) instead of O(out·in·min(out, in)).

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
    qd, rd = torch.linalg.qr(down.T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ uc, s, vch @ qd.T
