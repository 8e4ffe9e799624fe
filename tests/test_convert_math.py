"""Properties of the pure parts of `loratool convert`: casts, alpha dtype, adapter → LoRA factors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.adapters import AdapterModule, delta, module_shape, to_lora_factors
from loratool.arch import ModuleTarget
from loratool.dtypes import all_finite, float_max
from loratool.dtypes import cast as cast_float
from loratool.ops.convert import alpha_in_dtype

LIMITS = {"F16": 65504.0, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=40),
    st.sampled_from(sorted(LIMITS)),
    st.booleans(),
)
def test_cast_float_clamps_then_rounds_like_torch(values, dtype, into):
    """The same rule with and without ``out=`` (the blocked merge casts straight into its output)."""
    x = torch.tensor(values, dtype=torch.float32)
    if into:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn if dtype == "F8_E4M3" else
                          torch.float8_e5m2 if dtype == "F8_E5M2" else torch.float16)
        y, n = cast_float(x.clone(), dtype, out=out)
        assert y is out
    else:
        y, n = cast_float(x, dtype)
    limit = LIMITS[dtype]
    assert float_max(dtype) == limit
    assert n == int((x.abs() > limit).sum())
    yf = y.float()
    assert not torch.isinf(yf).any()  # never creates an infinity
    assert torch.equal(torch.isnan(yf), torch.isnan(x))  # NaN stays NaN, nothing else becomes NaN
    inside = x.abs() <= limit
    expected = x[inside].to(y.dtype).float()  # torch's round-to-nearest-even inside the range
    assert torch.equal(yf[inside], expected)
    over = (x.abs() > limit) & ~torch.isnan(x)
    assert torch.equal(yf[over], torch.sign(x[over]) * limit)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=20),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]),
)
def test_all_finite_agrees_with_isfinite(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)  # fp16/fp8 casts may themselves overflow to inf/NaN
    assert all_finite(x) == bool(torch.isfinite(x.float()).all())


@pytest.mark.parametrize(("src", "dst"), [("F16", "BF16"), ("F16", "F8_E4M3"), ("F16", "F8_E5M2"),
                                          ("F8_E5M2", "BF16"), ("F8_E5M2", "F8_E4M3")])
@pytest.mark.parametrize("workers", ["1", "3"])
def test_cast_through_float32_blocks_equals_torchs_direct_cast_for_every_bit_pattern(monkeypatch, src, dst, workers):
    """Every fp16 / fp8 bit pattern, tiled past one block (and cut at odd block edges), gives the value
    torch's one-step cast gives after the clamp; NaN stays NaN (its bit pattern may differ)."""
    from loratool import dtypes

    monkeypatch.setenv("LORATOOL_THREADS", workers)
    monkeypatch.setattr(dtypes, "CAST_BLOCK", 1000)  # blocks and runs end off any vector boundary
    bits = 16 if src == "F16" else 8
    pats = torch.arange(1 << bits, dtype=torch.int32).to(torch.int16 if bits == 16 else torch.uint8)
    x = pats.view(dtypes.to_torch(src)).repeat(3)[: 3 * (1 << bits) - 7].reshape(-1, 1)  # a column: reshape(-1) copies nothing
    y, n = cast_float(x, dst)
    assert y.dtype == dtypes.to_torch(dst) and y.shape == x.shape
    limit = float_max(dst)
    xf = x.float()
    nan = torch.isnan(xf)
    narrowing = float_max(src) > limit  # only a cast into a narrower range clamps (an fp16 inf stays inf in bf16)
    expected = (xf.clamp(-limit, limit) if narrowing else xf).to(y.dtype)  # torch's own one-step cast after the clamp
    assert torch.equal(torch.isnan(y.float()), nan)
    assert torch.equal(y[~nan].float(), expected[~nan].float())
    assert torch.equal(y[~nan].view(torch.uint8 if y.element_size() == 1 else torch.int16),
                       expected[~nan].view(torch.uint8 if y.element_size() == 1 else torch.int16))  # -0.0 kept too
    assert n == (int((xf.abs() > limit).sum()) if narrowing else 0)
    out = torch.empty(x.shape, dtype=y.dtype)
    assert cast_float(x, dst, out=out)[0] is out and torch.equal(out[~nan].float(), expected[~nan].float())


def test_cast_rounding_is_nearest_even():
    # 1.0625 is halfway between e4m3 neighbours 1.0 and 1.125 → even mantissa 1.0;
    # 1.1875 is halfway between 1.125 and 1.25 → 1.25.
    y, _ = cast_float(torch.tensor([1.0625, 1.1875]), "F8_E4M3")
    assert y.float().tolist() == [1.0, 1.25]


def test_cast_leaves_integers_untouched():
    ids = torch.arange(77, dtype=torch.int64).reshape(1, 77)
    y, n = cast_float(ids, "F16")
    assert y is ids and n == 0


def test_alpha_kept_exact():
    assert alpha_in_dtype(torch.tensor(8.0), "F16").dtype == torch.float16
    a = alpha_in_dtype(torch.tensor(0.1, dtype=torch.float32), "F16")
    assert a.dtype == torch.float32 and float(a) == float(torch.tensor(0.1, dtype=torch.float32))
    i = torch.tensor(32, dtype=torch.int64)
    assert alpha_in_dtype(i, "F16") is i


# ----------------------------------------------------------------------------- adapter → LoRA

LINEAR = ModuleTarget("lora_unet_x_to_q", "linear", "w", None, (12, 10), "unet/x.to_q.weight")
CONV = ModuleTarget("lora_unet_x_conv1", "conv3x3", "c", None, (8, 6, 3, 3), "unet/x.conv1.weight")


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_loha_to_lora_exact_rank_at_most_r_squared(seed, rank):
    t = {
        "hada_w1_a": _rand(12, rank, seed=seed),
        "hada_w1_b": _rand(rank, 10, seed=seed + 10),
        "hada_w2_a": _rand(12, rank, seed=seed + 20),
        "hada_w2_b": _rand(rank, 10, seed=seed + 30),
        "alpha": torch.tensor(1.5),
    }
    m = AdapterModule(LINEAR, "loha", t)
    want = delta(m, (12, 10))
    down, up, alpha, err = to_lora_factors(m)
    assert down.shape[0] <= rank * rank and alpha == down.shape[0]
    got = (alpha / down.shape[0]) * (up @ down)
    assert _rel(got, want) < 1e-5 and err < 1e-4


def test_loha_conv_flattened_factors():
    r = 2
    t = {
        "hada_w1_a": _rand(8, r, seed=1),
        "hada_w1_b": _rand(r, 6 * 9, seed=2),
        "hada_w2_a": _rand(8, r, seed=3),
        "hada_w2_b": _rand(r, 6 * 9, seed=4),
        "alpha": torch.tensor(2.0),
    }
    m = AdapterModule(CONV, "loha", t)
    assert module_shape(m) == (8, 6, 3, 3)
    down, up, alpha, err = to_lora_factors(m)
    assert down.shape == (down.shape[0], 6, 3, 3) and up.shape == (8, down.shape[0], 1, 1)
    got = torch.einsum("or,rihw->oihw", up.reshape(8, -1), down)
    assert _rel(got, delta(m, (8, 6, 3, 3))) < 1e-5


def test_loha_tucker_dense_path():
    r = 2
    t = {
        "hada_t1": _rand(r, r, 3, 3, seed=1),
        "hada_w1_a": _rand(r, 8, seed=2),
        "hada_w1_b": _rand(r, 6, seed=3),
        "hada_t2": _rand(r, r, 3, 3, seed=4),
        "hada_w2_a": _rand(r, 8, seed=5),
        "hada_w2_b": _rand(r, 6, seed=6),
        "alpha": torch.tensor(1.0),
    }
    m = AdapterModule(CONV, "loha", t)
    down, up, alpha, err = to_lora_factors(m)
    got = torch.einsum("or,rihw->oihw", up.reshape(8, -1), down)
    assert _rel(got, delta(m, (8, 6, 3, 3))) < 1e-4 and err < 1e-4


@pytest.mark.parametrize("full_w2", [False, True])
def test_lokr_to_lora_kron_of_svds(full_w2):
    # out 12 = 3·4, in 10 = 2·5; w1 full (3,2), w2 rank 2 (4,5) or full.
    t = {"lokr_w1": _rand(3, 2, seed=1), "alpha": torch.tensor(1.0)}
    if full_w2:
        t["lokr_w2"] = _rand(4, 5, seed=2)
    else:
        t["lokr_w2_a"], t["lokr_w2_b"] = _rand(4, 2, seed=2), _rand(2, 5, seed=3)
    m = AdapterModule(LINEAR, "lokr", t)
    assert module_shape(m) == (12, 10)
    down, up, alpha, err = to_lora_factors(m)
    bound = 2 * (4 if full_w2 else 2)  # rank(w1) · rank(w2)
    assert down.shape[0] <= bound
    got = (alpha / down.shape[0]) * (up @ down)
    assert _rel(got, delta(m, (12, 10))) < 1e-5


def test_lokr_conv():
    # conv (8, 6, 3, 3): w1 (2, 2), w2 (4, 3·9) flattened.
    t = {"lokr_w1": _rand(2, 2, seed=1), "lokr_w2_a": _rand(4, 2, seed=2), "lokr_w2_b": _rand(2, 27, seed=3)}
    m = AdapterModule(CONV, "lokr", t)
    assert module_shape(m) == (8, 6, 3, 3)
    down, up, alpha, err = to_lora_factors(m)
    got = torch.einsum("or,rihw->oihw", up.reshape(8, -1), down)
    assert _rel(got, delta(m, (8, 6, 3, 3))) < 1e-5


def test_locon_mid_folds_exactly_keeping_rank():
    r = 3
    t = {
        "down": _rand(r, 6, 1, 1, seed=1),
        "mid": _rand(r, r, 3, 3, seed=2),
        "up": _rand(8, r, 1, 1, seed=3),
        "alpha": torch.tensor(1.0),
    }
    m = AdapterModule(CONV, "lora", t)
    down, up, alpha, err = to_lora_factors(m)
    assert down.shape == (r, 6, 3, 3) and alpha == 1.0 and err == 0.0
    got = (alpha / r) * torch.einsum("or,rihw->oihw", up.reshape(8, r), down)
    assert _rel(got, delta(m, (8, 6, 3, 3))) < 1e-5


def test_plain_lora_passes_through_and_max_rank_error_is_the_svd_tail():
    down, up = _rand(4, 10, seed=1), _rand(12, 4, seed=2)
    m = AdapterModule(LINEAR, "lora", {"down": down, "up": up, "alpha": torch.tensor(2.0)})
    d2, u2, a2, e2 = to_lora_factors(m)
    assert torch.equal(d2, down) and torch.equal(u2, up) and a2 == 2.0 and e2 == 0.0
    d1, u1, a1, e1 = to_lora_factors(m, max_rank=2)
    assert d1.shape[0] == 2 and a1 == 2.0
    want = delta(m, (12, 10))
    s = torch.linalg.svdvals(want.double())
    tail = math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum()))
    assert abs(e1 - tail) < 1e-5
    assert abs(_rel(u1 @ d1, want) - tail) < 1e-4


def test_negative_alpha_sign_kept():
    t = {
        "hada_w1_a": _rand(12, 2, seed=1),
        "hada_w1_b": _rand(2, 10, seed=2),
        "hada_w2_a": _rand(12, 2, seed=3),
        "hada_w2_b": _rand(2, 10, seed=4),
        "alpha": torch.tensor(-1.0),
    }
    m = AdapterModule(LINEAR, "loha", t)
    down, up, alpha, _ = to_lora_factors(m)
    assert _rel((alpha / down.shape[0]) * up @ down, delta(m, (12, 10))) < 1e-5
