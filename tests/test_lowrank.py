"""Properties of the low-rank math: exact factored SVD, randomized SVD, rank rules, budgets, clamping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.errors import LoratoolError
from loratool.ops.lowrank import (
    FIXED,
    Budget,
    SvCumulative,
    SvFro,
    SvRatio,
    allocate_budget,
    choose_rank,
    clamp_quantile,
    factored_svd,
    parse_rule,
    randomized_svd,
    retention,
    split_sqrt,
)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 24), inp=st.integers(1, 24), r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_factored_svd_equals_dense_svd(out, inp, r, seed):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, inp, generator=g, dtype=torch.float64)
    u, s, vh = factored_svd(up, down)
    dense = up @ down
    s_dense = torch.linalg.svdvals(dense)
    k = min(r, out, inp)
    assert s.shape == (k,)
    torch.testing.assert_close(s, s_dense[:k], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-9, rtol=0)


def test_factored_svd_batched_matches_single():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(3, 10, 4, generator=g), torch.randn(3, 4, 7, generator=g)
    _, s, _ = factored_svd(up, down)
    for i in range(3):
        torch.testing.assert_close(s[i], factored_svd(up[i], down[i])[1])


def test_split_sqrt_balances_and_reconstructs_rank_k():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 9, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    up, down = split_sqrt(u, s, vh, 3)
    torch.testing.assert_close(up @ down, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1))  # √σ on both sides


def _with_spectrum(s: list[float], m: int = 120, n: int = 90, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ q2.T


def test_randomized_svd_close_to_exact_and_deterministic():
    spectrum = [10.0 * 0.8**i for i in range(60)]
    a = _with_spectrum(spectrum).float()
    u, s, vh = randomized_svd(a, 8, seed=3)
    exact = torch.tensor(spectrum[:8])
    assert torch.allclose(s, exact, rtol=1e-2)
    err = (a - u @ torch.diag(s) @ vh).norm()
    best = math.sqrt(sum(x * x for x in spectrum[8:]))
    assert float(err) <= 1.01 * best
    u2, s2, vh2 = randomized_svd(a, 8, seed=3)
    assert torch.equal(s, s2) and torch.equal(u, u2) and torch.equal(vh, vh2)


def test_randomized_svd_small_matrix_falls_back_to_exact():
    a = _with_spectrum([3.0, 2.0, 1.0], m=6, n=5).float()
    _, s, _ = randomized_svd(a, 2, oversample=10)
    torch.testing.assert_close(s, torch.tensor([3.0, 2.0]))


# ----------------------------------------------------------------------------- rules on hand-made spectra


def S(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "spectrum, rule, max_rank, expected",
    [
        # sv_ratio: keep σ ≥ σ0 / X; boundary σ = σ0/X is kept
        (S(8, 4, 2, 1), SvRatio(4), 10, 3),
        (S(8, 4, 2, 1), SvRatio(3.99), 10, 2),
        (S(8, 4, 2, 1), SvRatio(1), 10, 1),
        (S(8, 4, 2, 1), SvRatio(100), 2, 2),  # capped by --rank
        # sv_fro: smallest k with Σσ²[:k]/Σσ² ≥ X²; σ² = 9,4,1,1,1 → 0.5625, 0.8125, 0.875, 0.9375, 1
        (S(3, 2, 1, 1, 1), SvFro(0.75), 10, 1),  # exactly 0.5625 = 0.75²
        (S(3, 2, 1, 1, 1), SvFro(0.9), 10, 2),  # 0.81 ≤ 0.8125
        (S(3, 2, 1, 1, 1), SvFro(math.sqrt(0.875)), 10, 3),  # boundary through a square root
        (S(3, 2, 1, 1, 1), SvFro(math.sqrt(0.8126)), 10, 3),
        (S(3, 2, 1, 1, 1), SvFro(1.0), 10, 5),
        (S(3, 2, 1, 1, 1), SvFro(1.0), 4, 4),
        # sv_cumulative: smallest k with Σσ[:k]/Σσ ≥ X; σ = 4,2,1,1 → 0.5, 0.75, 0.875, 1
        (S(4, 2, 1, 1), SvCumulative(0.5), 10, 1),
        (S(4, 2, 1, 1), SvCumulative(0.75), 10, 2),
        (S(4, 2, 1, 1), SvCumulative(0.7500001), 10, 3),
        (S(4, 2, 1, 1), SvCumulative(1.0), 10, 4),
        # fixed / budget per module: the cap
        (S(4, 2, 1, 1), FIXED, 3, 3),
        (S(4, 2), FIXED, 8, 2),
        # all-zero spectrum: at least rank 1
        (S(0, 0, 0), SvFro(0.9), 10, 1),
    ],
)
def test_rules_pick_documented_rank(spectrum, rule, max_rank, expected):
    assert choose_rank(spectrum, rule, max_rank) == expected


def test_sv_fro_on_truncated_spectrum_uses_total_norm():
    # leading σ = 3, 2 of a matrix whose ‖·‖²_F is 16 (tail 1,1,1 unseen)
    assert choose_rank(S(3, 2), SvFro(0.9), 10, total_sq=16.0) == 2
    assert choose_rank(S(3, 2), SvFro(0.95), 10, total_sq=16.0) == 2  # not reachable: the cap (all we have)
    assert retention(S(3, 2), 1, total_sq=16.0) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "text, rule",
    [
        ("fixed", FIXED),
        ("sv_ratio:4", SvRatio(4.0)),
        ("SV_FRO:0.9", SvFro(0.9)),
        ("sv_cumulative:0.5", SvCumulative(0.5)),
        ("size:12.5", Budget(megabytes=12.5)),
        ("params:1000", Budget(params=1000)),
    ],
)


def test_parse_rule(text, rule):
    assert parse_rule(text) == rule


@pytest.mark.parametrize("text", ["sv_fro:1.5", "sv_ratio:0.5", "size:0", "params:1.5", "nope", "sv_fro:x", "fixed:2"])
def test_parse_rule_rejects(text):
    with pytest.raises(LoratoolError):
        parse_rule(text)


def test_budget_allocates_where_sigma_squared_per_parameter_is_largest():
    spectra = {"a": S(10, 1), "b": S(5, 4)}
    costs = {"a": 10, "b": 1}
    caps = {"a": 8, "b": 8}
    base = 10 + 1  # rank 1 everywhere first
    assert allocate_budget(spectra, costs, base, caps) == {"a": 1, "b": 1}
    # b's second σ² per parameter (16) beats a's (0.1); a's does not fit in what is left
    assert allocate_budget(spectra, costs, base + 9, caps) == {"a": 1, "b": 2}
    assert allocate_budget(spectra, costs, base + 11, caps) == {"a": 2, "b": 2}
    assert allocate_budget(spectra, costs, base + 11, {"a": 1, "b": 8}) == {"a": 1, "b": 2}
    assert Budget(megabytes=1).param_budget(2) == 500_000


def test_budget_keeps_prefix_order_within_a_module():
    spectra = {"a": S(3, 2, 2, 1)}
    ranks = allocate_budget(spectra, {"a": 1}, 3, {"a": 4})
    assert ranks == {"a": 3}


def test_clamp_quantile_uses_the_pooled_kth_value():
    up = torch.arange(1, 51, dtype=torch.float32).reshape(10, 5)
    down = -torch.arange(51, 101, dtype=torch.float32).reshape(5, 10)
    cu, cd = clamp_quantile(up, down, 0.9)
    assert float(cu.max()) == 50 and float(cd.min()) == -90  # 90th of 100 pooled |values|
    cu, cd = clamp_quantile(up, down, 1.0)
    assert torch.equal(cu, up) and torch.equal(cd, down)
    with pytest.raises(LoratoolError):
        clamp_quantile(up, down, 0.0)
