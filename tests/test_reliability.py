"""Hostile inputs: every public entry gives the right result or a clear error naming the
argument (quantize ranges, non-finite scale, decode/topk/rope/KVCache/memory/presets
arguments, masked arrays, bounded work)."""

import math
import tracemalloc

import numpy as np
import pytest

import fa_lab
from fa_lab.tools import memory, presets
from fa_lab.numerics import reference
from fa_lab.features.retrieval import topk_reference
from fa_lab.numerics.testing import Case


def _qkv(N=9, d=4, dtype=np.float32, seed=0, H=2):
    return Case(B=1, H=H, Nq=N, Nk=N, d=d).inputs(dtype, seed=seed)


# --- quantize: float64 beyond float32's range, subnormals, bounded block -------------

def test_quantize_float64_beyond_float32_range():
    x = np.array([[1e39, 1.0], [-3e39, 2.0]])
    xq, s = fa_lab.quantize(x, "per_tensor")
    assert np.isfinite(s).all() and (s > 0).all() and s.dtype == np.float32
    np.testing.assert_array_equal(xq, [[42, 0], [-127, 0]])
    with pytest.raises(ValueError, match="float64"):
        fa_lab.dequantize(xq, s)  # float32 cannot hold 3e39
    np.testing.assert_allclose(fa_lab.dequantize(xq, s, np.float64), x, rtol=0.02, atol=1e37)


@pytest.mark.parametrize("value", [1e-44, 1e-40, 1e-310])
def test_quantize_subnormal_is_right_or_a_clear_error(value):
    x = np.array([[value, -value / 2]])
    xq, s = fa_lab.quantize(x, "per_token", scale_dtype=np.float64)
    assert (s > 0).all() and np.isfinite(s).all()
    np.testing.assert_allclose(fa_lab.dequantize(xq, s, np.float64), x, rtol=0.01)
    if value / 127 < 1e-45:  # below float32's smallest subnormal
        with pytest.raises(ValueError, match=r"^x: .*float32"):
            fa_lab.quantize(x, "per_token")
    else:
        xq, s = fa_lab.quantize(x.astype(np.float32), "per_token")
        assert (s > 0).all() and xq[0, 0] == 127


def test_quantize_of_the_smallest_subnormal_is_a_clear_error():
    with pytest.raises(ValueError, match="^x: .*cannot hold; rescale x"):
        fa_lab.quantize(np.array([[5e-324, 0.0]]), "per_tensor", scale_dtype=np.float64)


def test_attention_int8_of_huge_finite_float64_inputs_is_not_nan():
    q, k, v = _qkv(dtype=np.float64)
    out = fa_lab.attention_int8(q * 1e39, k, v)
    assert np.isfinite(out).all()
    expected, _ = reference.attention(q * 1e39, k, v)  # one-hot rows, up to INT8 rounding
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_quantize_block_is_clamped_to_N():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    tracemalloc.start()
    try:
        xq, s = fa_lab.quantize(x, "per_block", block=10**8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    np.testing.assert_array_equal(s, fa_lab.quantize(x, "per_tensor")[1].reshape(1, 1) *
                                  np.ones((4, 1), np.float32))


@pytest.mark.parametrize("scales, exc, match", [
    (np.float32(np.nan), ValueError, "scales must be finite"),
    (-1.0, ValueError, "scales must be finite and positive"),
    (np.ones((3, 1)), ValueError, "scales of shape"),
    (np.array(["a"]), TypeError, "scales must be a float"),
])
def test_dequantize_names_scales(scales, exc, match):
    with pytest.raises(exc, match=match):
        fa_lab.dequantize(np.ones((2, 2), np.int8), scales)


# --- non-finite scale: every public entry ---------------------------------------------

def _entries(scale):
    q, k, v = _qkv()
    out, lse = fa_lab.attention(q, k, v, return_lse=True)
    cache = fa_lab.KVCache(1, 2, 9, 4)
    cache.append(k, v)
    return {
        "attention": lambda: fa_lab.attention(q, k, v, scale=scale),
        "plan": lambda: fa_lab.plan(q, k, v, scale=scale),
        "attention_backward": lambda: fa_lab.attention_backward(q, k, v, out, lse, out,
                                                                scale=scale),
        "attention_int8": lambda: fa_lab.attention_int8(q, k, v, scale=scale),
        "decode": lambda: fa_lab.decode(q[:, :, :1], cache, scale=scale),
        "topk_attention": lambda: fa_lab.topk_attention(q[0, 0], k[0, 0], k=2, scale=scale),
    }


@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, float("nan"), 10**400])
@pytest.mark.parametrize("entry", list(_entries(1.0)))
def test_non_finite_scale_is_rejected_everywhere(entry, scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        _entries(scale)[entry]()


def test_topk_names_the_real_problem():
    q, k, _ = _qkv()
    with pytest.raises(TypeError, match="scale"):
        fa_lab.topk_attention(q[0, 0], k[0, 0], k=2, scale=None)
    big = np.full((3, 4), 1e30, np.float32)
    with pytest.raises(ValueError, match="overflows float32"):
        fa_lab.topk_attention(big[0], big, k=2)
    with pytest.raises(ValueError, match=r"scale \* query overflows"):
        fa_lab.topk_attention(big[0], big, k=2, scale=1e10)
    bad = k[0, 0].copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="keys must be finite"):
        fa_lab.topk_attention(q[0, 0], bad, k=2)
    idx, s = fa_lab.topk_attention(q[0, 0, :2], k[0, 0], k=3, scale=0.5)
    ridx, rs = topk_reference(q[0, 0, :2], k[0, 0], 3, scale=0.5)
    np.testing.assert_array_equal(idx, ridx)


# --- decode ---------------------------------------------------------------------------

def _cache(L=40, d=4):
    q, k, v = Case(B=1, H=2, Nq=L, Nk=L, d=d).inputs(np.float32, seed=1)
    cache = fa_lab.KVCache(1, 2, L, d)
    cache.append(k, v)
    return q[:, :, -3:], k, v, cache


@pytest.mark.parametrize("kw, exc, match", [
    (dict(block_kv=-3), ValueError, "block_kv must be a positive int"),
    (dict(block_kv=0), ValueError, "block_kv must be a positive int"),
    (dict(block_kv=2.5), TypeError, "block_kv must be a positive int"),
    (dict(block_kv=True), TypeError, "block_kv must be a positive int"),
    (dict(splits=0), ValueError, "splits must be a positive int"),
    (dict(splits=-2), ValueError, "splits must be a positive int"),
    (dict(splits=2.5), TypeError, "splits must be a positive int"),
    (dict(return_lse="no"), TypeError, "return_lse must be a bool"),
])
def test_decode_argument_errors(kw, exc, match):
    q, _, _, cache = _cache()
    with pytest.raises(exc, match=match):
        fa_lab.decode(q, cache, **kw)


@pytest.mark.parametrize("splits", [1, 3, 10**9])
def test_decode_huge_splits_is_clamped_and_right(splits):
    q, k, v, cache = _cache(L=600)
    out = fa_lab.decode(q, cache, splits=splits, block_kv=64)
    expected, _ = reference.attention(q, k, v, causal="bottom_right")
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# --- KVCache, rope, presets, memory -------------------------------------------------

def test_kvcache_dtype_errors_name_the_argument():
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got 'bogus'"):
        fa_lab.KVCache(1, 1, 4, 2, dtype="bogus")
    cache = fa_lab.KVCache(1, 1, 4, 2)
    big = np.full((1, 1, 1, 2), 1e300)
    with pytest.raises(TypeError, match="k_new has dtype float64"):
        cache.append(big, big)
    assert cache.length == 0
    half = np.ones((1, 1, 1, 2), np.float16)
    cache.append(half, half)  # lossless: accepted
    assert cache.length == 1 and cache.k.dtype == np.float32
    wide = fa_lab.KVCache(1, 1, 4, 2, dtype=np.float64)
    wide.append(half.astype(np.float32), half.astype(np.float32))
    assert wide.length == 1


@pytest.mark.parametrize("kw, exc, match", [
    (dict(base=True), TypeError, "base"),
    (dict(base=np.inf), ValueError, "base must be a positive finite"),
    (dict(base=-2.0), ValueError, "base"),
    (dict(base="1e4"), TypeError, "base"),
    (dict(interleaved="no"), TypeError, "interleaved must be a bool"),
])
def test_rope_argument_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        fa_lab.rope(np.ones((3, 4)), np.arange(3), **kw)


@pytest.mark.parametrize("kw, exc", [(dict(N=-1), ValueError), (dict(B=0), ValueError),
                                     (dict(d=2.5), TypeError), (dict(H=True), TypeError)])
def test_presets_table_names_the_argument(kw, exc):
    with pytest.raises(exc, match=list(kw)[0]):
        presets.table(**kw)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(H_kv=3), ValueError, "multiple of H_kv"),
    (dict(threads=0), ValueError, "threads must be a positive int"),
    (dict(block_q=-64), ValueError, "block_q"),
    (dict(block_kv=0), ValueError, "block_kv"),
    (dict(dtype="bogus"), TypeError, "dtype"),
])
def test_memory_estimate_argument_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        memory.estimate("flash", 1, 4, 64, 64, 8, **kw)


@pytest.mark.parametrize("budget, exc", [(float("inf"), ValueError), (float("nan"), ValueError),
                                         (-1, ValueError), ("1GB", TypeError),
                                         (None, TypeError)])
def test_largest_n_bad_budget(budget, exc):
    with pytest.raises(exc, match="budget_bytes"):
        memory.largest_n("flash", budget)


def test_largest_n_tiny_budget_and_a_real_one():
    assert memory.largest_n("flash", 0) == 0
    n = memory.largest_n("flash", 10 * 2**20)
    assert n > 1
    need = lambda N: 3 * N * 64 * 4 + memory.estimate("flash", 1, 1, N, N, 64).total  # noqa
    assert need(n) <= 10 * 2**20 < need(2 * n)


# --- silently accepted before: return_lse, masked arrays ------------------------------

@pytest.mark.parametrize("value", ["no", 1, None, np.array([True])])
def test_return_lse_must_be_bool(value):
    q, k, v = _qkv()
    for fn in (fa_lab.attention, fa_lab.attention_int8):
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            fn(q, k, v, return_lse=value)


@pytest.mark.parametrize("name", ["q", "k", "v", "mask"])
def test_masked_arrays_are_refused_by_name(name):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v, "mask": np.ones((9, 9), bool)}
    args[name] = np.ma.masked_array(args[name], mask=np.zeros(args[name].shape, bool))
    for fn in (fa_lab.attention, fa_lab.attention_int8, fa_lab.plan):
        with pytest.raises(TypeError, match=f"{name} must be a plain ndarray, not a numpy "
                                            "masked array"):
            fn(args["q"], args["k"], args["v"], mask=args["mask"])


def test_masked_arrays_refused_in_decode_topk_quantize_rope():
    x = np.ma.masked_array(np.ones((1, 2, 3, 4), np.float32))
    cache = fa_lab.KVCache(1, 2, 3, 4)
    with pytest.raises(TypeError, match="k_new must be a plain ndarray"):
        cache.append(x, x)
    with pytest.raises(TypeError, match="masked"):
        fa_lab.topk_attention(x[0, 0], np.ones((3, 4), np.float32), k=1)
    with pytest.raises(TypeError, match="masked"):
        fa_lab.quantize(x)
    with pytest.raises(TypeError, match="masked"):
        fa_lab.rope(x, np.arange(3))


def test_scale_still_accepts_finite_numbers():
    q, k, v = _qkv()
    for scale in (0.0, -0.5, np.float32(0.3), 2):
        out = fa_lab.attention(q, k, v, scale=scale)
        np.testing.assert_allclose(out, reference.attention(q, k, v, scale=float(scale))[0],
                                   rtol=1e-4, atol=1e-5)
    assert math.isfinite(fa_lab.plan(q, k, v, scale=1e30)["block_q"])
