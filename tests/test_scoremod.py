"""flash-attn's score modifiers (window, softcap, ALiBi slopes): every kernel that says it
supports them against the float64 reference, over alignments, GQA, dtypes and awkward
shapes; the reference itself against independent formulations; tile skipping; errors."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fa_lab
from fa_lab.numerics import reference
from fa_lab.kernels.common import window_keys
from fa_lab.numerics.testing import AWKWARD_CASES, Case, assert_close

from conftest import block_kwargs, check_against_reference

MOD_KERNELS = [n for n, k in fa_lab.KERNELS.items() if k.window and k.softcap and k.alibi]
FAST = [n for n in MOD_KERNELS if n != "reference"]
ALIGNMENTS = [False, True, "bottom_right"]


def _slopes(H, B=None):
    s = 2.0 ** -np.arange(1, H + 1)  # ALiBi's geometric slopes
    return s if B is None else s[None] * (1 + np.arange(B))[:, None]


MODS = {
    "window": dict(window=(5, 3)),
    "window_left": dict(window=(4, -1)),
    "window_right": dict(window=(-1, 2)),
    "window_local": dict(window=(0, 0)),
    "softcap": dict(softcap=1.5),
    "alibi": "alibi",
    "all": "all",
}


def _opts(name, H, B):
    spec = MODS[name]
    if spec == "alibi":
        return dict(alibi_slopes=_slopes(H))
    if spec == "all":
        return dict(window=(6, 1), softcap=2.0, alibi_slopes=_slopes(H, B))
    return dict(spec)


def test_every_fast_kernel_supports_the_modifiers():
    # the contract: both fast kernels; 'auto' resolves to one of them
    assert {"tiled_simd", "flash"} <= set(FAST)


# --- the reference against independent formulations --------------------------------


@pytest.mark.parametrize("causal", ALIGNMENTS)
@pytest.mark.parametrize("window", [(0, 0), (3, 2), (-1, 4), (5, -1)])
def test_reference_window_equals_a_bool_mask(causal, window):
    q, k, v = Case(B=1, H=2, Nq=9, Nk=13, d=4).inputs(np.float64, seed=1)
    off = 0 if causal is True else 13 - 9
    i = np.arange(9)[:, None] + off
    j = np.arange(13)[None, :]
    allowed = np.ones((9, 13), bool)
    if window[0] >= 0:
        allowed &= j >= i - window[0]
    if window[1] >= 0:
        allowed &= j <= i + window[1]
    a = reference.attention(q, k, v, causal=causal, window=window)
    b = reference.attention(q, k, v, causal=causal, mask=allowed)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("causal", ALIGNMENTS)
def test_reference_alibi_equals_a_float_mask(causal):
    q, k, v = Case(B=2, H=3, Nq=7, Nk=11, d=4).inputs(np.float64, seed=2)
    slopes = _slopes(3, 2)
    off = 0 if causal is True else 11 - 7
    dist = np.abs(np.arange(7)[:, None] + off - np.arange(11)[None, :])
    bias = -slopes[:, :, None, None] * dist
    a = reference.attention(q, k, v, causal=causal, alibi_slopes=slopes)
    b = reference.attention(q, k, v, causal=causal, mask=bias)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-14, atol=1e-14)


def test_reference_softcap_by_hand():
    q = np.array([[2.0, 0.0]])  # one query, d = 2, scale 1
    k = np.array([[3.0, 0.0], [-1.0, 0.0], [0.5, 0.0]])
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = 2.0
    s = [c * math.tanh(x / c) for x in (6.0, -2.0, 1.0)]
    w = [math.exp(x) for x in s]
    out, lse = reference.attention(q, k, v, scale=1.0, softcap=c)
    np.testing.assert_allclose(out[0], [(w[0] + w[2]) / sum(w), (w[1] + w[2]) / sum(w)],
                               rtol=1e-14)
    np.testing.assert_allclose(lse[0], math.log(sum(w)), rtol=1e-14)
    # the cap bounds every score: |s| < c, so lse <= c + log(Nk)
    assert lse[0] < c + math.log(3)


def test_reference_softcap_before_mask_and_alibi_after():
    # the mask bias is added after the cap (not capped), ALiBi after the cap too
    q, k, v = Case(B=1, H=1, Nq=5, Nk=5, d=3).inputs(np.float64, seed=3)
    bias = np.full((5, 5), 10.0)
    _, lse = reference.attention(q, k, v, softcap=0.5, mask=bias)
    _, lse0 = reference.attention(q, k, v, softcap=0.5)
    np.testing.assert_allclose(lse, lse0 + 10.0, rtol=1e-13)
    _, lse_a = reference.attention(q, k, v, softcap=0.5, alibi_slopes=np.array([100.0]))
    assert np.all(lse_a < 0.5 + 1e-12)  # the diagonal (distance 0) dominates: lse ~ s_ii


# --- kernels against the reference -------------------------------------------------


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("causal", ALIGNMENTS)
def test_modifiers_every_alignment(mod_kernel, dtype, causal, mods):
    B, H, H_kv, Nq, Nk, d = 2, 4, 2, 19, 29, 7  # GQA, Nq != Nk, odd d
    q, k, v = Case(B=B, H=H, H_kv=H_kv, Nq=Nq, Nk=Nk, d=d).inputs(dtype, seed=4)
    check_against_reference(mod_kernel, q, k, v, causal=causal, **_opts(mods, H, B),
                            **block_kwargs(mod_kernel, 4, 6))


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=lambda c: c.id)
def test_modifiers_awkward_shapes(mod_kernel, dtype, case):
    q, k, v = case.inputs(dtype, seed=5)
    check_against_reference(mod_kernel, q, k, v, causal=case.causal, window=(9, 2),
                            softcap=3.0, alibi_slopes=_slopes(case.H),
                            **block_kwargs(mod_kernel, case.block_q, case.block_kv))


@pytest.mark.parametrize("mods", ["window", "all"])
def test_modifiers_with_a_mask(mod_kernel, dtype, mods):
    q, k, v = Case(B=2, H=3, Nq=17, Nk=23, d=8).inputs(dtype, seed=6)
    rng = np.random.default_rng(7)
    mask = rng.random((2, 3, 17, 23)) < 0.7
    check_against_reference(mod_kernel, q, k, v, causal="bottom_right", mask=mask,
                            **_opts(mods, 3, 2), **block_kwargs(mod_kernel, 5, 4))


def test_auto_serves_the_modifiers_without_fallback(dtype):
    q, k, v = Case(B=1, H=2, Nq=33, d=16).inputs(dtype, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_reference("auto", q, k, v, causal=True, window=(8, 0), softcap=5.0,
                                alibi_slopes=_slopes(2))
    assert fa_lab.plan(q, k, v, window=(8, 0), softcap=5.0)["kernel"] == "flash"


def test_large_logits_with_softcap(mod_kernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=33, Nk=40, d=16).inputs(dtype, seed=9, magnitude=1e4)
    out, lse = check_against_reference(mod_kernel, q, k, v, causal=True, softcap=30.0,
                                       **block_kwargs(mod_kernel, 8, 16))
    assert np.isfinite(out).all() and np.all(lse <= 30.0 + math.log(40) + 1e-3)


def test_split_kv_path_with_window(dtype):
    # few query rows, long keys: flash splits the keys (Flash-Decoding) and merges by lse
    q, k, v = Case(B=1, H=2, Nq=3, Nk=3001, d=32).inputs(dtype, seed=10)
    opts = dict(causal="bottom_right", window=(700, 0), softcap=4.0, alibi_slopes=_slopes(2))
    assert fa_lab.plan(q, k, v, kernel="flash", **opts)["splits"] > 1
    check_against_reference("flash", q, k, v, **opts)


def test_window_rows_that_see_no_key_give_zeros_and_neg_inf(mod_kernel, dtype):
    # Nq=7 > Nk=4, no causal: offset -3; window (2, 0): rows 0..2 stand before every key
    q, k, v = Case(B=1, H=2, Nq=7, Nk=4, d=3).inputs(dtype, seed=11)
    out, lse = check_against_reference(mod_kernel, q, k, v, window=(2, 0), softcap=1.0,
                                       alibi_slopes=_slopes(2), **block_kwargs(mod_kernel, 2, 3))
    assert np.all(out[..., :3, :] == 0) and np.all(np.isneginf(lse[..., :3]))
    assert np.isfinite(lse[..., 3:]).all()


def test_nan_outside_the_window_reaches_no_row(mod_kernel, dtype):
    q, k, v = Case(B=1, H=1, Nq=20, d=4).inputs(dtype, seed=12)
    v[0, 0, 0] = np.nan  # key 0: inside the window of rows 0..2 only
    k[0, 0, 1] = np.nan  # key 1: rows 1..3
    out, lse = fa_lab.attention(q, k, v, kernel=mod_kernel, window=(2, 0), return_lse=True,
                                **block_kwargs(mod_kernel, 8, 8))
    assert np.isnan(out[0, 0, :4]).all(axis=-1).all()
    assert np.isfinite(out[0, 0, 4:]).all() and np.isfinite(lse[0, 0, 4:]).all()


def test_local_window_of_width_zero_returns_v():
    q, k, v = Case(B=1, H=2, Nq=13, d=5).inputs(np.float64, seed=13)
    for kernel in FAST:
        out = fa_lab.attention(q, k, v, kernel=kernel, window=(0, 0), block_q=4, block_kv=4)
        np.testing.assert_allclose(out, v, rtol=1e-12)


def test_half_precision_passes_the_modifiers():
    q, k, v = (x.astype(np.float16) for x in Case(B=1, H=2, Nq=9, d=8).inputs(seed=14))
    out = fa_lab.attention(q, k, v, window=(2, 0), softcap=2.0)
    exp = fa_lab.attention(*(x.astype(np.float32) for x in (q, k, v)), window=(2, 0),
                           softcap=2.0)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), exp, atol=2e-3)


# --- tile skipping (a count, not a timing) ------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (5, 0), (7, 3), (-1, 2), (4, -1), (-1, -1)])
def test_window_keys_is_tight_and_complete(causal, window):
    Nq, Nk, bq, bk = 37, 41, 8, 6
    off = 0 if causal else Nk - Nq
    allowed = reference.window_mask(Nq, Nk, window, off)
    if causal:
        allowed &= reference.causal_mask(Nq, Nk, True)
    for i0 in range(0, Nq, bq):
        br = min(bq, Nq - i0)
        lo, hi = window_keys(i0, br, Nk, causal, off, window[0], window[1], bk)
        seen = np.flatnonzero(allowed[i0:i0 + br].any(axis=0))
        if seen.size:  # complete: every visible key is in range; tight: to the block
            assert lo <= seen[0] and seen[-1] < hi
            assert lo // bk == seen[0] // bk and hi == seen[-1] + 1
        else:
            assert lo >= hi


def test_sliding_window_visits_a_sixteenth_of_the_causal_tiles():
    # the benchmark shape: N=8192, window (256, 0) against full causal, flash's
    # 256 x 256 tiles: tiles computed = what the kernel's loop bounds give
    N, (bq, bk) = 8192, fa_lab.settings.config.FLASH_BLOCKS

    def tiles(left, right, causal):
        return sum(-(-(hi - lo) // bk) for i0 in range(0, N, bq)
                   for lo, hi in [window_keys(i0, min(bq, N - i0), N, causal, 0, left, right,
                                              bk)])
    causal, window = tiles(-1, -1, True), tiles(256, 0, False)
    assert causal == 32 * 33 // 2 and window == 1 + 2 * 31
    assert causal / window > 8


# --- hypothesis properties ------------------------------------------------------------


shapes = st.tuples(st.integers(1, 3), st.integers(1, 30), st.integers(1, 30),
                   st.integers(1, 9))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, causal=st.sampled_from(ALIGNMENTS), seed=st.integers(0, 2**16),
       kernel=st.sampled_from(FAST), bq=st.integers(1, 12), bk=st.integers(1, 12),
       cap=st.sampled_from([0.0, 2.0]))
def test_unbounded_window_equals_no_window(shape, causal, seed, kernel, bq, bk, cap):
    H, Nq, Nk, d = shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((H, n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
    kw = dict(causal=causal, kernel=kernel, block_q=bq, block_kv=bk, softcap=cap,
              return_lse=True)
    base = fa_lab.attention(q, k, v, **kw)
    for window in [(-1, -1), (Nq + Nk, Nq + Nk)]:  # the second runs the window code
        got = fa_lab.attention(q, k, v, window=window, **kw)
        np.testing.assert_allclose(got[0], base[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1], base[1], rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, causal=st.sampled_from(ALIGNMENTS), seed=st.integers(0, 2**16),
       kernel=st.sampled_from(FAST), left=st.integers(-1, 12), right=st.integers(-1, 12),
       bq=st.integers(1, 12), bk=st.integers(1, 12))
def test_window_matches_reference_over_small_shapes(shape, causal, seed, kernel, left, right,
                                                    bq, bk):
    H, Nq, Nk, d = shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((H, n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
    opts = dict(causal=causal, window=(left, right), alibi_slopes=_slopes(H))
    out, lse = fa_lab.attention(q, k, v, kernel=kernel, block_q=bq, block_kv=bk,
                                return_lse=True, **opts)
    exp, exp_lse = reference.attention(q, k, v, **opts)
    base, _ = reference.attention(q, k, v, dtype=np.float32, **opts)
    assert_close(out, exp, baseline=base, magnitude=np.abs(v).max())
    assert np.array_equal(np.isneginf(lse), np.isneginf(exp_lse))


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("window, exc, match", [
    ((1,), TypeError, "window"), ("ab", TypeError, "window"), (3, TypeError, "window"),
    ((1.5, 2), TypeError, "window left"), ((1, True), TypeError, "window right"),
    ((-2, 0), ValueError, "window left"), ((0, -5), ValueError, "window right"),
])
def test_bad_window(window, exc, match):
    q, k, v = Case(Nq=4, d=2).inputs()
    with pytest.raises(exc, match=match):
        fa_lab.attention(q, k, v, window=window)


@pytest.mark.parametrize("softcap, exc", [(-1.0, ValueError), (float("nan"), ValueError),
                                          (float("inf"), ValueError), ("2", TypeError),
                                          (None, TypeError), (True, TypeError)])
def test_bad_softcap(softcap, exc):
    q, k, v = Case(Nq=4, d=2).inputs()
    with pytest.raises(exc, match="softcap"):
        fa_lab.attention(q, k, v, softcap=softcap)


@pytest.mark.parametrize("slopes, exc", [
    (np.ones(3), ValueError), (np.ones((2, 2)), ValueError), (np.ones((1, 2, 1)), ValueError),
    (np.array([0.5, np.nan]), ValueError), (np.array([0.5, np.inf]), ValueError),
    (np.array(["a", "b"]), TypeError), (np.array([True, False]), TypeError),
])
def test_bad_alibi_slopes(slopes, exc):
    q, k, v = Case(B=1, H=2, Nq=4, d=2).inputs()
    with pytest.raises(exc, match="alibi_slopes"):
        fa_lab.attention(q, k, v, alibi_slopes=slopes)


@pytest.mark.parametrize("kernel", [n for n in fa_lab.KERNELS if n not in MOD_KERNELS])
@pytest.mark.parametrize("option, value", [("window", (2, 0)), ("softcap", 1.0),
                                           ("alibi", np.ones(2))])
def test_teaching_kernels_refuse_by_name(kernel, option, value):
    q, k, v = Case(B=1, H=2, Nq=4, d=2).inputs()
    kw = {"alibi_slopes" if option == "alibi" else option: value}
    with pytest.raises(NotImplementedError, match=f"{kernel}.*{option}"):
        fa_lab.attention(q, k, v, kernel=kernel, **kw)


def test_auto_falls_back_with_a_reason_when_flash_cannot():
    q, k, v = Case(B=1, H=2, Nq=9, d=4).inputs()
    with pytest.warns(fa_lab.KernelFallbackWarning, match="dropout"):
        out = fa_lab.attention(q, k, v, window=(2, 0), dropout_p=0.1, seed=3)
    exp, _ = reference.attention(q, k, v, window=(2, 0), dropout_p=0.1, seed=3)
    base, _ = reference.attention(q, k, v, window=(2, 0), dropout_p=0.1, seed=3,
                                  dtype=np.float32)
    assert_close(out, exp, baseline=base, magnitude=np.abs(v).max() / 0.9)


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("window", [(0, 0), (5, 0), (7, 3), (-1, 2), (4, -1), (20, 20)])
def test_tiling_mirror_matches_the_kernels_loop_bounds(causal, window):
    # lessons draw fa_lab.numerics.tiling; the kernels run window_keys: the same tiles
    from fa_lab.numerics import tiling

    Nq, Nk, bq, bk = 37, 45, 8, 6
    alignment = reference.causal_alignment(causal)
    off = reference.feature_offset(Nq, Nk, alignment)
    classes = tiling.tile_classes(Nq, Nk, bq, bk, causal, window)
    allowed = reference.window_mask(Nq, Nk, window, off)
    if alignment:
        allowed &= reference.causal_mask(Nq, Nk, alignment)
    for a, i0 in enumerate(range(0, Nq, bq)):
        br = min(bq, Nq - i0)
        lo, hi = window_keys(i0, br, Nk, alignment is not None, off, *window, bk)
        computed = [c for c in range(classes.shape[1]) if lo <= c * bk < hi]
        assert computed == [c for c in range(classes.shape[1])
                            if classes[a, c] != tiling.SKIPPED]
        for c in range(classes.shape[1]):  # FULL tiles need no mask, DIAGONAL ones do
            block = allowed[i0:i0 + br, c * bk:(c + 1) * bk]
            if classes[a, c] == tiling.FULL:
                assert block.all()
            elif classes[a, c] == tiling.DIAGONAL:
                assert block.any() and not block.all()
