"""Family math against hand-computed tiny cases (every number below was worked out by hand)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.adapters import AdapterModule, apply_to_weight, delta, rank_of, scale_of
from loratool.arch import ModuleTarget

T = torch.tensor


def target(shape, kind="linear"):
    return ModuleTarget("lora_unet_x", kind, "model.diffusion_model.x.weight", None, tuple(shape), "unet/x.weight")


def module(family, shape, **tensors):
    kind = "conv3x3" if len(shape) == 4 else "linear"
    return AdapterModule(target(shape, kind), family, {k: v for k, v in tensors.items()})


# ----------------------------------------------------------------------------- LoRA / LoCon


def test_lora_linear_by_hand():
    # up (2,1) @ down (1,2) = [[3,6],[4,8]]; alpha 0.5, rank 1 → scale 0.5
    m = module("lora", (2, 2), down=T([[1.0, 2.0]]), up=T([[3.0], [4.0]]), alpha=T(0.5))
    assert torch.equal(delta(m), T([[1.5, 3.0], [2.0, 4.0]]))


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (None, 1.0),  # missing alpha ⇒ alpha = rank
        (T(2, dtype=torch.int64), 0.5),  # kohya svd_merge writes I64 alphas
        (T(2, dtype=torch.int32), 0.5),
        (T(2.0, dtype=torch.float16), 0.5),
        (T(2.0, dtype=torch.bfloat16), 0.5),
        (T([2.0]), 0.5),  # a 1-element vector instead of a 0-d scalar
    ],
)
def test_scale_alpha_dtypes(alpha, expected):
    t = {"down": torch.ones(4, 3), "up": torch.ones(5, 4)}
    if alpha is not None:
        t["alpha"] = alpha
    assert scale_of("lora", t) == expected
    assert rank_of("lora", t) == 4


def test_locon_3x3_by_hand():
    # ΔW[o, 0, :, :] = up[o] · down[0, 0, :, :]
    down = torch.arange(9.0).reshape(1, 1, 3, 3)
    up = T([2.0, -1.0]).reshape(2, 1, 1, 1)
    m = module("lora", (2, 1, 3, 3), down=down, up=up)
    d = delta(m)
    assert torch.equal(d[0, 0], 2 * torch.arange(9.0).reshape(3, 3))
    assert torch.equal(d[1, 0], -torch.arange(9.0).reshape(3, 3))


def test_locon_tucker_mid_by_hand():
    # rank 1: ΔW = up · mid · down = 3 · arange(9) · 2, alpha 2 / rank 1 → ×2
    m = module(
        "lora", (1, 1, 3, 3),
        down=T([[[[2.0]]]]), mid=torch.arange(9.0).reshape(1, 1, 3, 3), up=T([[[[3.0]]]]), alpha=T(2.0),
    )  # fmt: skip
    assert torch.equal(delta(m), (12 * torch.arange(9.0)).reshape(1, 1, 3, 3))


def test_locon_tucker_rank2_matches_loop():
    g = torch.Generator().manual_seed(0)
    down, mid = torch.randn(2, 3, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    up = torch.randn(4, 2, 1, 1, generator=g)
    m = module("lora", (4, 3, 3, 3), down=down, mid=mid, up=up)
    want = torch.zeros(4, 3, 3, 3)
    for o in range(4):
        for i in range(3):
            for a in range(2):
                for b in range(2):
                    want[o, i] += up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0]
    torch.testing.assert_close(delta(m), want)


# ----------------------------------------------------------------------------- LoHa


def test_loha_by_hand():
    # w1 = [[1],[2]]@[[3,4]] = [[3,4],[6,8]]; w2 = [[1],[1]]@[[1,-1]] = [[1,-1],[1,-1]]; ΔW = w1 ⊙ w2
    m = module(
        "loha", (2, 2),
        hada_w1_a=T([[1.0], [2.0]]), hada_w1_b=T([[3.0, 4.0]]), hada_w2_a=T([[1.0], [1.0]]), hada_w2_b=T([[1.0, -1.0]]),
        alpha=T(3.0),
    )  # fmt: skip
    assert torch.equal(delta(m), 3 * T([[3.0, -4.0], [6.0, -8.0]]))


def test_loha_conv_flattened_factors():
    # conv factors stored flattened (r, in·kh·kw); ΔW reshaped to (out, in, kh, kw)
    m = module(
        "loha", (1, 1, 2, 2),
        hada_w1_a=T([[2.0]]), hada_w1_b=T([[1.0, 2.0, 3.0, 4.0]]), hada_w2_a=T([[1.0]]), hada_w2_b=T([[1.0, 1.0, 0.0, -1.0]]),
    )  # fmt: skip
    assert torch.equal(delta(m), T([2.0, 4.0, 0.0, -8.0]).reshape(1, 1, 2, 2))


def test_loha_tucker_matches_loop():
    g = torch.Generator().manual_seed(1)
    r, o, i = 2, 3, 2
    t1, t2 = torch.randn(r, r, 3, 3, generator=g), torch.randn(r, r, 3, 3, generator=g)
    a1, b1, a2, b2 = (torch.randn(r, n, generator=g) for n in (o, i, o, i))
    m = module("loha", (o, i, 3, 3), hada_t1=t1, hada_w1_a=a1, hada_w1_b=b1, hada_t2=t2, hada_w2_a=a2, hada_w2_b=b2, alpha=T(1.0))
    w1, w2 = torch.zeros(o, i, 3, 3), torch.zeros(o, i, 3, 3)
    for p in range(o):
        for q in range(i):
            for x in range(r):
                for y in range(r):
                    w1[p, q] += t1[x, y] * a1[x, p] * b1[y, q]
                    w2[p, q] += t2[x, y] * a2[x, p] * b2[y, q]
    torch.testing.assert_close(delta(m), w1 * w2 * 0.5)  # alpha 1 / rank 2


# ----------------------------------------------------------------------------- LoKr

W1 = T([[1.0, 2.0], [3.0, 4.0]])
W2 = T([[0.0, 1.0], [1.0, 0.0]])
KRON = T([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0], [3.0, 0.0, 4.0, 0.0]])


def test_lokr_full_full_4x4_by_hand_ignores_alpha():
    # no low-rank factor ⇒ scale 1, whatever alpha says
    m = module("lokr", (4, 4), lokr_w1=W1, lokr_w2=W2, alpha=T(7.0))
    assert rank_of("lokr", m.tensors) is None
    assert torch.equal(delta(m), KRON)


def test_lokr_w2_lowrank_by_hand():
    # w2 = [[1],[2]] @ [[1,1]] = [[1,1],[2,2]]; alpha 0.5 / rank 1
    m = module("lokr", (4, 4), lokr_w1=W1, lokr_w2_a=T([[1.0], [2.0]]), lokr_w2_b=T([[1.0, 1.0]]), alpha=T(0.5))
    w2 = T([[1.0, 1.0], [2.0, 2.0]])
    assert torch.equal(delta(m), 0.5 * torch.kron(W1, w2))
    assert torch.equal(delta(m)[0], 0.5 * T([1.0, 1.0, 2.0, 2.0]))


def test_lokr_w1_lowrank_w2_full_uses_w1_rank():
    # w1 = [[1],[3]] @ [[1,2]] = [[1,2],[3,6]]; rank from lokr_w1_b = 1, alpha 2 → ×2
    m = module("lokr", (4, 4), lokr_w1_a=T([[1.0], [3.0]]), lokr_w1_b=T([[1.0, 2.0]]), lokr_w2=W2, alpha=T(2.0))
    assert rank_of("lokr", m.tensors) == 1
    assert torch.equal(delta(m), 2 * torch.kron(T([[1.0, 2.0], [3.0, 6.0]]), W2))


def test_lokr_both_lowrank_rank_from_w2():
    m = module(
        "lokr", (4, 4),
        lokr_w1_a=torch.ones(2, 3), lokr_w1_b=torch.ones(3, 2),
        lokr_w2_a=torch.ones(2, 1), lokr_w2_b=torch.ones(1, 2), alpha=T(1.0),
    )  # fmt: skip
    assert rank_of("lokr", m.tensors) == 1  # w2's rank wins, as in ComfyUI / LyCORIS
    assert torch.equal(delta(m), torch.full((4, 4), 3.0))


def test_lokr_conv_kron_and_tucker():
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(2, 1, generator=g)
    t2, wa, wb = torch.randn(1, 1, 3, 3, generator=g), torch.randn(1, 2, generator=g), torch.randn(1, 3, generator=g)
    m = module("lokr", (4, 3, 3, 3), lokr_w1=w1, lokr_t2=t2, lokr_w2_a=wa, lokr_w2_b=wb, alpha=T(1.0))
    w2 = torch.zeros(2, 3, 3, 3)
    for p in range(2):
        for q in range(3):
            w2[p, q] = t2[0, 0] * wa[0, p] * wb[0, q]
    want = torch.zeros(4, 3, 3, 3)
    for a in range(2):
        for b in range(2):
            for d in range(3):
                want[a * 2 + b, d] = w1[a, 0] * w2[b, d]
    torch.testing.assert_close(delta(m), want)


# ----------------------------------------------------------------------------- DoRA

W = T([[3.0, 4.0], [0.0, 1.0]])
ZERO = {"down": torch.zeros(1, 2), "up": torch.zeros(2, 1)}


def test_dora_out_axis_by_hand():
    # ΔW = 0 so V = W; row norms 5 and 1; m = (10, 2) → rows × 2
    for m_shape in ((2, 1), (2,)):  # LyCORIS wd_on_out (out,1) and PEFT lora_magnitude_vector (out,)
        m = module("lora", (2, 2), dora_scale=T([10.0, 2.0]).reshape(m_shape), **ZERO)
        torch.testing.assert_close(apply_to_weight(W, m, 1.0), T([[6.0, 8.0], [0.0, 2.0]]))
        torch.testing.assert_close(apply_to_weight(W, m, 0.5), T([[4.5, 6.0], [0.0, 1.5]]))


def test_dora_in_axis_by_hand():
    # column norms 3 and √17; m = (6, 2) on the input axis (1, in)
    m = module("lora", (2, 2), dora_scale=T([[6.0, 2.0]]), **ZERO)
    s = 2 / math.sqrt(17)
    torch.testing.assert_close(apply_to_weight(W, m, 1.0), T([[6.0, 4 * s], [0.0, 1 * s]]))


def test_dora_norm_is_of_merged_weight():
    # V = W + ΔW = [[3,4],[0,1]] + [[0,0],[3,3]] = [[3,4],[3,4]]: row norms 5, 5
    m = module("lora", (2, 2), down=T([[1.0, 1.0]]), up=T([[0.0], [3.0]]), dora_scale=T([[5.0], [10.0]]))
    torch.testing.assert_close(apply_to_weight(W, m, 1.0), T([[3.0, 4.0], [6.0, 8.0]]))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.floats(-4, 4), st.floats(0.1, 16))
def test_lora_apply_is_base_plus_scaled_product(out_f, in_f, r, ratio, alpha):
    g = torch.Generator().manual_seed(out_f * 100 + in_f * 10 + r)
    down, up, w = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), torch.randn(out_f, in_f, generator=g)
    m = module("lora", (out_f, in_f), down=down, up=up, alpha=T(alpha))
    torch.testing.assert_close(apply_to_weight(w, m, ratio), w + ratio * (alpha / r) * (up @ down), rtol=1e-5, atol=1e-5)
