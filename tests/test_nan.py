"""One NaN rule in every kernel and the reference: NaN in a key or value reaches exactly
the rows that can see that key, whatever the kernel, tile size or way the key is hidden
(causal, a bool mask, ``-inf`` in a float mask), forward, INT8 and backward.

The expected NaN pattern is computed here from visibility alone (not from any kernel);
the finite part must match the reference on the same input with the NaN replaced.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import assert_close, lse_magnitude

from conftest import block_kwargs

TILES = [(None, None), (2, 2), (4, 4), (3, 5), (16, 7)]


def visibility(Nq, Nk, causal, mask):
    """(…, Nq, Nk) bool: query i sees key j."""
    vis = np.ones((Nq, Nk), bool)
    if causal:
        vis &= reference.causal_mask(Nq, Nk, causal)
    if mask is not None:
        vis = vis & (mask if mask.dtype == np.bool_ else ~np.isneginf(mask))
    return vis


def expected_nan(q, k, v, causal, mask):
    """NaN patterns of (out, lse) from visibility only (kv heads broadcast over q heads)."""
    H, Nq, Nk = q.shape[-3], q.shape[-2], k.shape[-2]
    vis = np.broadcast_to(visibility(Nq, Nk, causal, mask), q.shape[:-1] + (Nk,))
    kv = lambda x: reference.repeat_kv(x, H)  # noqa: E731
    bad_k = np.isnan(kv(k)).any(-1)  # (..., H, Nk)
    lse_nan = (vis & bad_k[..., None, :]).any(-1)
    out_nan = lse_nan[..., None] | (
        (vis[..., :, :, None] & np.isnan(kv(v))[..., None, :, :]).any(-2))
    return out_nan, lse_nan


def check_nan_rule(kernel, q, k, v, causal=False, mask=None, table="forward", **kw):
    """Run ``kernel``; its NaN pattern must be the visibility one; the rest must match
    the reference computed with every NaN replaced by 0."""
    out_nan, lse_nan = expected_nan(q, k, v, causal, mask)
    assert out_nan.any(), "test setup: some row must see a NaN"
    run = fa_lab.attention if table == "forward" else fa_lab.attention_int8
    out, lse = run(q, k, v, kernel=kernel, causal=causal, mask=mask, return_lse=True, **kw)
    np.testing.assert_array_equal(np.isnan(out), out_nan, err_msg=f"{kernel} out NaN pattern")
    np.testing.assert_array_equal(np.isnan(lse), lse_nan, err_msg=f"{kernel} lse NaN pattern")
    if table != "forward":
        return  # INT8: the pattern is the point here; accuracy lives in test_int8
    clean = [np.nan_to_num(x, nan=0.0) for x in (q, k, v)]
    ref_out, ref_lse = reference.attention(*clean, causal=causal, mask=mask)
    base_out, base_lse = reference.attention(*clean, causal=causal, mask=mask,
                                             dtype=q.dtype.type)
    assert_close(np.where(out_nan, ref_out, out).astype(out.dtype), ref_out, baseline=base_out,
                 what=f"{kernel} out", magnitude=np.max(np.abs(clean[2]), initial=0.0))
    assert_close(np.where(lse_nan, ref_lse, lse).astype(lse.dtype), ref_lse, baseline=base_lse,
                 what=f"{kernel} lse", magnitude=lse_magnitude(ref_lse, clean[0], clean[1]))


@pytest.mark.parametrize("tiles", TILES, ids=str)
def test_issue_reproducer_nan_value_hidden_by_causality(kernel, dtype, tiles):
    q, k, v = (np.random.default_rng(i).standard_normal((1, 2, 8, 4)).astype(dtype)
               for i in range(3))
    v[0, 0, 7, 0] = np.nan  # only row 7 of head 0 sees key 7
    check_nan_rule(kernel, q, k, v, causal=True, **block_kwargs(kernel, *tiles))
    out = fa_lab.attention(q, k, v, kernel=kernel, causal=True, **block_kwargs(kernel, *tiles))
    assert np.isnan(out).sum() == 1 and np.isnan(out[0, 0, 7, 0])


@pytest.mark.parametrize("tiles", TILES, ids=str)
@pytest.mark.parametrize("hide", ["bool", "float", "causal_bottom_right"])
def test_nan_key_and_value_hidden_by_a_mask(kernel, dtype, tiles, hide):
    Nq, Nk, d = 13, 11, 3  # prime-ish, Nq != Nk, odd d
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 2, Nq, d)).astype(dtype)
    k = rng.standard_normal((2, 1, Nk, d)).astype(dtype)  # MQA: one kv head
    v = rng.standard_normal((2, 1, Nk, d)).astype(dtype)
    k[0, 0, 4, 1] = np.nan
    v[1, 0, 9, 2] = np.nan
    v[0, 0, 10, 0] = np.nan
    causal, mask = False, None
    if hide == "causal_bottom_right":
        causal = "bottom_right"
    else:
        m = rng.random((Nq, Nk)) < 0.6
        m[:, 4] = np.arange(Nq) % 3 == 0  # key 4 (NaN in batch 0) seen by rows 0, 3, ...
        m[:, 9] = np.arange(Nq) < 2
        m[5] = False  # a fully masked row stays zeros, never NaN
        mask = m if hide == "bool" else np.where(m, dtype(0.25), dtype(-np.inf)).astype(dtype)
    check_nan_rule(kernel, q, k, v, causal=causal, mask=mask, **block_kwargs(kernel, *tiles))


@pytest.mark.parametrize("kernel_name", ["flash", "tiled_simd"])
def test_nan_hidden_from_a_decode_row_split_kv(kernel_name):
    # one query row against 1100 keys: flash splits the keys (Flash-Decoding)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 1100, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 1100, 8)).astype(np.float32)
    k[0, 0, 700, 3] = np.nan
    v[0, 1, 1000, 5] = np.nan
    v[0, 1, 12, 5] = np.nan
    mask = np.ones((1, 2, 1, 1100), bool)
    mask[0, 0, 0, 700] = False
    mask[0, 1, 0, 1000] = False  # head 1 still sees key 12: channel 5 NaN there only
    if kernel_name == "flash":
        assert fa_lab.plan(q, k, v, mask=mask)["splits"] > 1 or fa_lab.settings.config.num_threads() == 1
    check_nan_rule(kernel_name, q, k, v, mask=mask)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(Nq=st.integers(1, 12), Nk=st.integers(1, 12), d=st.integers(1, 5),
       causal=st.sampled_from([False, True, "bottom_right"]), use_mask=st.booleans(),
       bq=st.integers(1, 6), bk=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_nan_rule_hypothesis(Nq, Nk, d, causal, use_mask, bq, bk, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
    j = rng.integers(Nk)
    (k if rng.random() < 0.5 else v)[0, 0, j, rng.integers(d)] = np.nan
    mask = (rng.random((Nq, Nk)) < 0.7) if use_mask else None
    out_nan, _ = expected_nan(q, k, v, causal, mask)
    if not out_nan.any():
        return  # nobody sees the NaN: every kernel must then be NaN-free
    for name in fa_lab.KERNELS:
        check_nan_rule(name, q, k, v, causal=causal, mask=mask, **block_kwargs(name, bq, bk))


@pytest.mark.parametrize("int8_kernel", list(fa_lab.INT8_KERNELS))
@pytest.mark.parametrize("hide", ["causal", "bool"])
def test_int8_nan_value_reaches_only_rows_that_see_it(int8_kernel, hide):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, n, 5)).astype(np.float32) for n in (9, 9, 9))
    v[0, 0, 8, 1] = np.nan
    v[0, 1, 3, 4] = np.nan
    kw = {"causal": True} if hide == "causal" else {"mask": np.arange(9)[None, :] != 3}
    if hide == "bool":
        kw["mask"] = np.broadcast_to(kw["mask"], (9, 9)).copy()
        kw["mask"][:, 8] = np.arange(9) >= 6
    kw.update(block_kwargs("tiled", 4, 3) if fa_lab.INT8_KERNELS[int8_kernel].tiled else {})
    if "bf16_pv" in fa_lab.INT8_KERNELS[int8_kernel].tags:
        kw["pv_dtype"] = "bfloat16"  # its only P V
    if fa_lab.INT8_KERNELS[int8_kernel].available and fa_lab.INT8_KERNELS[int8_kernel].available():
        pytest.skip(fa_lab.INT8_KERNELS[int8_kernel].available())
    check_nan_rule(int8_kernel, q, k, v, table="int8", **kw)


@pytest.mark.parametrize("bwd", list(fa_lab.BACKWARD_KERNELS))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backward_nan_hidden_key_and_value_stay_hidden(bwd, dropout_p):
    rng = np.random.default_rng(2)
    Nq, Nk, d = 10, 10, 3
    q, k, v = (rng.standard_normal((1, 2, n, d)) for n in (Nq, Nk, Nk))
    dout = rng.standard_normal(q.shape)
    mask = reference.causal_mask(Nq, Nk)
    mask[8:, :7] = False  # rows 8 and 9 see keys 7, 8, 9 only
    kw = dict(mask=mask, dropout_p=dropout_p, seed=5 if dropout_p else None)
    out, lse = fa_lab.attention(q, k, v, kernel="reference", return_lse=True, **kw)
    clean = fa_lab.attention_backward(q, k, v, out, lse, dout, kernel="reference", **kw)
    k[0, 0, 9, 0] = np.nan  # seen only by row 9
    v[0, 1, 8, 2] = np.nan  # seen by rows 8, 9 of head 1
    out, lse = fa_lab.attention(q, k, v, kernel="reference", return_lse=True, **kw)
    got = fa_lab.attention_backward(q, k, v, out, lse, dout, kernel=bwd,
                                    **block_kwargs("tiled", 4, 3) if bwd == "tiled" else {},
                                    **kw)
    dq, dk, dv = got
    sees = np.zeros((1, 2, Nq), bool)
    sees[0, 0, 9] = sees[0, 1, 8] = sees[0, 1, 9] = True
    assert np.isnan(dq[sees]).all() and not np.isnan(dq[~sees]).any()
    np.testing.assert_allclose(dq[~sees], clean[0][~sees], rtol=1e-10, atol=1e-12)
    # keys 0..6 are seen by no row that sees a NaN: their gradients are exact
    np.testing.assert_allclose(dk[..., :7, :], clean[1][..., :7, :], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dv[..., :7, :], clean[2][..., :7, :], rtol=1e-10, atol=1e-12)
    assert np.isnan(dk[..., 7:, :]).any(axis=-1).all()  # the NaN rows' keys
    ref = fa_lab.attention_backward(q, k, v, out, lse, dout, kernel="reference", **kw)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{bwd} {name}")
