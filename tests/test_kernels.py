"""Every registered kernel against the float64 reference, over awkward shapes and options."""

import numpy as np
import pytest

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import AWKWARD_CASES, Case

from conftest import block_kwargs, check_against_reference


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=lambda c: c.id)
def test_awkward_shapes(kernel, dtype, case):
    q, k, v = case.inputs(dtype)
    check_against_reference(kernel, q, k, v, causal=case.causal,
                            **block_kwargs(kernel, case.block_q, case.block_kv))


@pytest.mark.parametrize("d", [1, 7, 64, 128])
@pytest.mark.parametrize("N", [1, 3, 17, 64, 113, 127, 257])
def test_every_N_and_d(kernel, N, d):
    q, k, v = Case(B=1, H=1, Nq=N, d=d).inputs(np.float32, seed=N * 1000 + d)
    check_against_reference(kernel, q, k, v, causal="bottom_right",
                            **block_kwargs(kernel, 16, 24))


@pytest.mark.parametrize("causal", [False, True, "top_left", "bottom_right"])
@pytest.mark.parametrize("mask_kind", ["bool_full", "bool_keys", "float_alibi", "float_heads"])
def test_masks_combined_with_causal(kernel, dtype, causal, mask_kind):
    B, H, Nq, Nk, d = 2, 3, 19, 23, 8
    q, k, v = Case(B=B, H=H, Nq=Nq, Nk=Nk, d=d).inputs(dtype, seed=3)
    rng = np.random.default_rng(4)
    if mask_kind == "bool_full":  # (B, H, Nq, Nk)
        mask = rng.random((B, H, Nq, Nk)) < 0.7
    elif mask_kind == "bool_keys":  # key padding, broadcast over heads and queries
        mask = np.arange(Nk)[None, None, None, :] < np.array([15, 23])[:, None, None, None]
    elif mask_kind == "float_alibi":  # (H, Nq, Nk) distance bias, ALiBi style
        slopes = 2.0 ** -np.arange(1, H + 1)
        dist = np.arange(Nk)[None, :] - np.arange(Nq)[:, None]
        mask = (slopes[:, None, None] * -np.abs(dist)).astype(dtype)
    else:  # float (1, H, 1, Nk) with some -inf
        mask = rng.standard_normal((1, H, 1, Nk)).astype(dtype)
        mask[..., ::5] = -np.inf
    check_against_reference(kernel, q, k, v, causal=causal, mask=mask,
                            **block_kwargs(kernel, 8, 6))


def test_fully_masked_rows_give_zeros_and_neg_inf_lse(kernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=11, Nk=9, d=5).inputs(dtype, seed=5)
    mask = np.ones((11, 9), bool)
    mask[[0, 4, 10]] = False  # three rows see nothing
    out, lse = check_against_reference(kernel, q, k, v, mask=mask,
                                       **block_kwargs(kernel, 4, 4))
    assert np.all(out[..., [0, 4, 10], :] == 0)
    assert np.all(np.isneginf(lse[..., [0, 4, 10]]))
    assert np.isfinite(out).all()


def test_bottom_right_with_more_queries_than_keys_masks_leading_rows(kernel, dtype):
    # Nq=7 > Nk=4: offset -3, so queries 0..2 see no key (flash-attn's convention).
    q, k, v = Case(B=1, H=1, Nq=7, Nk=4, d=3).inputs(dtype, seed=6)
    out, lse = check_against_reference(kernel, q, k, v, causal="bottom_right",
                                       **block_kwargs(kernel, 2, 3))
    assert np.all(out[0, 0, :3] == 0) and np.all(np.isneginf(lse[0, 0, :3]))
    assert np.all(np.isfinite(lse[0, 0, 3:]))


def test_large_logits(kernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=33, Nk=40, d=16).inputs(dtype, seed=7, magnitude=1e4)
    out, _ = check_against_reference(kernel, q, k, v, causal=True,
                                     **block_kwargs(kernel, 8, 16))
    assert np.isfinite(out).all()


def test_nan_in_one_query_row_stays_in_that_row(kernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=13, Nk=10, d=4).inputs(dtype, seed=8)
    q[0, 1, 5, 2] = np.nan
    out, lse = fa_lab.attention(q, k, v, kernel=kernel, return_lse=True,
                                **block_kwargs(kernel, 4, 4))
    assert np.isnan(out[0, 1, 5]).all() and np.isnan(lse[0, 1, 5])
    clean = np.ones(out.shape[:-1], bool)
    clean[0, 1, 5] = False
    assert np.isfinite(out[clean]).all() and np.isfinite(lse[clean]).all()
    check_against_reference(kernel, q, k, v, **block_kwargs(kernel, 4, 4))


def test_nan_row_that_sees_no_other_key_is_nan_not_zero(kernel):
    # A row whose only visible scores are NaN must not be mistaken for a masked row.
    q, k, v = Case(B=1, H=1, Nq=4, Nk=4, d=3).inputs(np.float32, seed=9)
    q[0, 0, 0] = np.nan
    out = fa_lab.attention(q, k, v, causal=True, kernel=kernel)
    assert np.isnan(out[0, 0, 0]).all() and np.isfinite(out[0, 0, 1:]).all()


def test_strided_views(kernel, dtype):
    rng = np.random.default_rng(10)
    base = rng.standard_normal((2, 20, 3, 12)).astype(dtype)  # (B, N, H, 2d) layout
    q = base[..., :6].transpose(0, 2, 1, 3)  # non-contiguous (B, H, N, d)
    k = base[:, ::2, :, 6:].transpose(0, 2, 1, 3)  # every other token
    v = base[:, 1::2, :, 6:].transpose(0, 2, 1, 3)[..., ::-1]  # reversed channels
    assert not q.flags.c_contiguous and not k.flags.c_contiguous
    check_against_reference(kernel, q, k, v, causal="bottom_right",
                            **block_kwargs(kernel, 7, 3))


def test_two_dim_and_extra_leading_dims(kernel, dtype):
    q, k, v = Case(B=1, H=1, Nq=9, Nk=12, d=5).inputs(dtype, seed=11)
    check_against_reference(kernel, q[0, 0], k[0, 0], v[0, 0], causal=True)
    rng = np.random.default_rng(12)
    q5, k5, v5 = (rng.standard_normal(s).astype(dtype) for s in
                  [(2, 3, 4, 6, 5), (2, 3, 2, 7, 5), (2, 3, 2, 7, 5)])
    check_against_reference(kernel, q5, k5, v5, causal="bottom_right",
                            mask=rng.random((3, 1, 6, 7)) < 0.8)


def test_custom_scale(kernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=10, Nk=10, d=6).inputs(dtype, seed=13)
    check_against_reference(kernel, q, k, v, scale=0.37)


def test_empty_queries_and_empty_keys(kernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=4, Nk=3, d=5).inputs(dtype, seed=14)
    out, lse = fa_lab.attention(q[:, :, :0], k, v, kernel=kernel, return_lse=True)
    assert out.shape == (1, 2, 0, 5) and lse.shape == (1, 2, 0) and out.dtype == dtype
    out, lse = fa_lab.attention(q, k[:, :, :0], v[:, :, :0], kernel=kernel, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_float64_agrees_to_1e12(kernel):
    q, k, v = Case(B=2, H=2, Nq=70, Nk=90, d=32).inputs(np.float64, seed=15)
    out = fa_lab.attention(q, k, v, causal=True, kernel=kernel, **block_kwargs(kernel, 16, 32))
    exp, _ = reference.attention(q, k, v, causal=True)
    assert np.max(np.abs(out - exp)) < 1e-12


def test_auto_picks_the_top_rung():
    kernel, skipped = fa_lab.choose_kernel("auto", fa_lab.registry.Request(dtype=np.float32))
    assert kernel is fa_lab.ladder()[-1] and skipped == []


def test_long_sequence_accuracy(kernel):
    # Sequential float32 sums over thousands of keys lose to NumPy's pairwise sums:
    # before blocked/float64 accumulation, naive/online/tiled_simd failed here.
    q, k, v = Case(B=1, H=1, Nq=4096, d=64).inputs(np.float32, seed=1)
    check_against_reference(kernel, q, k, v)


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_dropout_forward_matches_reference(kernel, causal):
    spec = fa_lab.KERNELS[kernel]
    q, k, v = Case(B=2, H=4, H_kv=2, Nq=33, Nk=47, d=8).inputs(np.float32, seed=16)
    opts = {"dropout_p": 0.35, "seed": 2**63 + 7, "causal": causal}
    if not spec.dropout:
        with pytest.raises(NotImplementedError, match="does not support dropout"):
            fa_lab.attention(q, k, v, kernel=kernel, **opts)
        return
    out, lse = check_against_reference(kernel, q, k, v, **opts, **block_kwargs(kernel, 8, 16))
    plain, plain_lse = fa_lab.attention(q, k, v, kernel=kernel, return_lse=True, causal=causal,
                                        **block_kwargs(kernel, 8, 16))
    np.testing.assert_array_equal(lse, plain_lse)  # dropout does not touch the LSE
    assert not np.allclose(out, plain)


@pytest.mark.parametrize("dtype_", [np.float32, np.float64])
@pytest.mark.parametrize("opts", [{}, {"causal": True, "mask": True, "gqa": True}])
def test_auto_never_picks_the_fa1_teaching_rung(dtype_, opts, monkeypatch):
    # Even when every rung above 3 is unavailable, tiled (same rung, listed first) wins.
    req = fa_lab.registry.Request(dtype=dtype_, **opts)
    assert fa_lab.choose_kernel("auto", req)[0].name != "fa1"
    for name in ("flash", "tiled_simd"):
        monkeypatch.delitem(fa_lab.KERNELS, name)
    assert fa_lab.choose_kernel("auto", req)[0].name == "tiled"
