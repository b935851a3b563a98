"""Quantized KV caches: quantize_kv's rule and layout, the "quantized" kernel against the
float64 reference of the dequantized cache (exact up to float rounding) for int8, int4 and
float32 caches, contiguous and paged, ragged, split, GQA, several queries, both code paths;
writes quantized in place; KVCache(kv_dtype=...) and decode; TinyLM's greedy tokens; and
every bad input."""

import numpy as np
import pytest

import fa_lab
from fa_lab.features.decoding.tinylm import TinyLM
from fa_lab.features.kvcache import paginate
from fa_lab.kernels.layouts import kvtiles, quantized
from fa_lab.numerics import quant, reference
from fa_lab.numerics.kvquant import bytes_per_token, dequantize_kv, quantize_kv
from fa_lab.numerics.testing import assert_close, lse_magnitude


def _kv(shape_k, d_v=None, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(shape_k).astype(np.float32)
    k += offset * rng.standard_normal(shape_k[-1]).astype(np.float32)  # per-channel offsets
    v = rng.standard_normal(shape_k[:-1] + (d_v or shape_k[-1],)).astype(np.float32)
    return k, v


# ---------------------------------------------------------------- the format

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 2, 16])
@pytest.mark.parametrize("N", [0, 1, 5])
def test_round_trip_error_is_half_a_step(bits, group, N):
    k, v = _kv((2, 3, N, 32), d_v=16, seed=N)
    kq, ks, vq, vs = quantize_kv(k, v, bits=bits, group=group)
    qmax = 127 if bits == 8 else 7
    g_k, g_v = group or 32, group or 16
    assert kq.dtype == (np.int8 if bits == 8 else np.uint8)
    assert kq.shape == (2, 3, N, 32 * bits // 8) and ks.shape == (2, 3, N, 32 // g_k)
    assert vq.shape == (2, 3, N, 16 * bits // 8) and vs.shape == (2, 3, N, 16 // g_v)
    assert ks.dtype == np.float32
    for x, xq, s, g in ((k, kq, ks, g_k), (v, vq, vs, g_v)):
        back = dequantize_kv(xq, s)
        step = np.repeat(s, g, axis=-1)
        assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-5) + 1e-7)
        amax = np.abs(x).reshape(x.shape[:-1] + (x.shape[-1] // g, g)).max(-1, initial=0)
        np.testing.assert_allclose(s, np.where(amax > 0, amax / qmax, 1), rtol=1e-6)


def test_int8_per_token_is_the_int8_attention_rule():
    k, v = _kv((2, 2, 9, 24))
    kq, ks, _, _ = quantize_kv(k, v, bits=8)
    xq, scales = quant.quantize(k, "per_token")
    np.testing.assert_array_equal(kq, xq)
    np.testing.assert_array_equal(ks, scales)


def test_int4_nibble_order_is_q4_0():
    """Within a group of g channels, byte j holds channel j (low nibble) and j + g/2."""
    x = np.array([[1, 2, 3, 4, -1, -2, -3, -7]], np.float32)  # amax 7: scale 1, exact
    q, s = fa_lab.quantize_kv(x, x, bits=4)[:2]
    assert s[0, 0] == 1 and q.shape == (1, 4)
    lo = (q.astype(np.int16) & 0xF) ^ 8
    hi = (q.astype(np.int16) >> 4) ^ 8
    np.testing.assert_array_equal(lo - 8, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(hi - 8, [[-1, -2, -3, -7]])


def test_a_zero_group_gets_scale_one_and_stays_zero():
    k = np.zeros((1, 4, 8), np.float32)
    k[0, 1, :4] = 3.0
    kq, ks, _, _ = quantize_kv(k, k, bits=4, group=4)
    assert ks[0, 0, 0] == 1 and ks[0, 1, 1] == 1
    np.testing.assert_array_equal(dequantize_kv(kq, ks), k)


def test_bytes_per_token():
    assert bytes_per_token(128, kv_dtype="float32") == 1024
    assert bytes_per_token(128, kv_dtype="int8") == 256 + 8
    assert bytes_per_token(128, kv_dtype="int4") == 128 + 8
    assert bytes_per_token(128, kv_dtype="int4", group=32) == 128 + 32
    assert bytes_per_token(64, 32, kv_dtype="int8") == 96 + 8


# ---------------------------------------------------------------- the kernel

def _expected(q, kd, vd, lens, causal):
    """float64 and float32 references per sequence on the dequantized contiguous cache."""
    res = []
    for dt in (np.float64, np.float32):
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, l = reference.attention(q[b], kd[b, :, :lens[b]], vd[b, :, :lens[b]],
                                       causal="bottom_right" if causal else False, dtype=dt)
            outs.append(o)
            lses.append(l)
        res.append((np.stack(outs), np.stack(lses)))
    return res


def _check(out, lse, exp, base, q, kd, vd):
    assert_close(out, exp[0], baseline=base[0], magnitude=np.abs(vd).max() * 2)
    assert_close(lse, exp[1], baseline=base[1], what="lse",
                 magnitude=lse_magnitude(exp[1], q, kd) + 2)


SHAPES = [  # (H, H_kv, Nq, d, d_v, group): vector path (d % 16, d_v % 32) and plain loops
    (8, 2, 1, 32, 64, None), (3, 1, 2, 64, 32, 32), (4, 4, 3, 48, 32, 16),
    (6, 2, 1, 6, 10, 2), (2, 1, 4, 20, 40, None)]


@pytest.mark.parametrize("fmt", ["int8", "int4", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "page7", "page16"])
@pytest.mark.parametrize("causal", [True, False])
def test_against_the_reference_of_the_dequantized_cache(fmt, shape, layout, causal):
    H, H_kv, Nq, d, d_v, group = shape
    rng = np.random.default_rng(d + d_v)
    k, v = _kv((3, H_kv, 70, d), d_v=d_v, seed=H)
    q = rng.standard_normal((3, H, Nq, d)).astype(np.float32)
    lens = np.array([70, 5, 33])
    if fmt == "float32":
        kq, vq, ks, vs = k, v, None, None
        kd, vd = k, v
    else:
        if fmt == "int4" and group is not None and group % 2:
            pytest.skip("int4 groups are even")
        kq, ks, vq, vs = quantize_kv(k, v, bits=8 if fmt == "int8" else 4, group=group)
        kd, vd = dequantize_kv(kq, ks), dequantize_kv(vq, vs)
    exp, base = _expected(q, kd, vd, lens, causal)
    table = None
    if layout != "contiguous":  # one seed: values and scales get the same block table
        page = int(layout[4:])
        kq, vq, table = paginate(kq, vq, page, num_blocks=40, rng=np.random.default_rng(7))
        if ks is not None:
            ks, vs, _ = paginate(ks, vs, page, num_blocks=40, rng=np.random.default_rng(7))
    for splits in (None, 1, 3):
        out, lse = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, causal=causal,
                                                 block_table=table, k_scale=ks, v_scale=vs,
                                                 kernel="quantized", block_kv=8,
                                                 splits=splits, return_lse=True)
        _check(out, lse, exp, base, q, kd, vd)


@pytest.mark.parametrize("fmt", ["int8", "int4", "float32"])
def test_vector_and_plain_loops_agree(fmt, monkeypatch):
    k, v = _kv((1, 2, 300, 64), seed=3)
    q = np.random.default_rng(4).standard_normal((1, 8, 1, 64)).astype(np.float32)
    args = (k, v, None, None) if fmt == "float32" else \
        quantize_kv(k, v, bits=8 if fmt == "int8" else 4, group=32)
    kq, ks, vq, vs = (args[0], args[2], args[1], args[3]) if fmt == "float32" else args
    assert quantized.vector_ok(kq.dtype, 64, ks, 64, vs)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(quantized, "VECTORS", on)
        outs.append(fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=300, k_scale=ks,
                                                  v_scale=vs, block_kv=37))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-6, rtol=1e-5)


def test_auto_picks_the_quantized_kernel_and_keeps_flash_for_float_caches():
    k, v = _kv((1, 1, 40, 16))
    q = np.ones((1, 2, 1, 16), np.float32)
    assert fa_lab.plan(q, k, v)["kernel"] == "flash"  # float data: flash, as before
    kq, ks, vq, vs = quantize_kv(k, v)
    out = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=40, k_scale=ks, v_scale=vs)
    ref = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=40, k_scale=ks, v_scale=vs,
                                        kernel="reference")
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_sinks_merge_into_a_quantized_cache():
    k, v = _kv((2, 2, 50, 32))
    q = np.random.default_rng(5).standard_normal((2, 4, 1, 32)).astype(np.float32)
    kq, ks, vq, vs = quantize_kv(k, v, bits=4)
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    out = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=[50, 9], k_scale=ks,
                                        v_scale=vs, sinks=sinks)
    kd, vd = dequantize_kv(kq, ks), dequantize_kv(vq, vs)
    for b, n in enumerate((50, 9)):
        r, _ = reference.attention(q[b], kd[b, :, :n], vd[b, :, :n], causal="bottom_right",
                                   sinks=sinks)
        np.testing.assert_allclose(out[b], r, atol=2e-6)


# ---------------------------------------------------------------- writes

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_new_tokens_are_quantized_on_write_in_place(bits, paged):
    k, v = _kv((2, 2, 24, 32))
    kn, vn = _kv((2, 2, 3, 32), seed=9)
    q = np.random.default_rng(6).standard_normal((2, 2, 3, 32)).astype(np.float32)
    kq, ks, vq, vs = quantize_kv(k, v, bits=bits, group=16)
    lens = np.array([4, 21])
    table = None
    if paged:
        rng = np.random.default_rng(2)
        kq, vq, table = paginate(kq, vq, 8, num_blocks=9, rng=rng)
        ks, vs, _ = paginate(ks, vs, 8, num_blocks=9, rng=np.random.default_rng(2))
    before = [x.copy() for x in (kq, ks, vq, vs)]
    out = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k=kn, v=vn,
                                        block_table=table, k_scale=ks, v_scale=vs)
    nq, ns, mq, ms = quantize_kv(kn, vn, bits=bits, group=16)
    changed = sum(int(np.sum(a != b)) for a, b in zip((kq, ks, vq, vs), before))
    assert changed > 0
    for b in range(2):
        for t in range(3):
            pos = lens[b] + t
            page, row = (table[b, pos // 8], pos % 8) if paged else (b, pos)
            np.testing.assert_array_equal(kq[page, :, row], nq[b, :, t])
            np.testing.assert_array_equal(ks[page, :, row], ns[b, :, t])
            np.testing.assert_array_equal(vq[page, :, row], mq[b, :, t])
            np.testing.assert_array_equal(vs[page, :, row], ms[b, :, t])
    ref = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=lens + 3, block_table=table,
                                        k_scale=ks, v_scale=vs, kernel="reference")
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_a_write_past_capacity_writes_nothing():
    kq, ks, vq, vs = quantize_kv(*_kv((1, 1, 8, 16)))
    snap = [x.copy() for x in (kq, ks, vq, vs)]
    kn, vn = _kv((1, 1, 3, 16))
    with pytest.raises(ValueError, match="capacity"):
        fa_lab.attention_with_kvcache(np.ones((1, 1, 1, 16), np.float32), kq, vq,
                                      cache_seqlens=6, k=kn, v=vn, k_scale=ks, v_scale=vs)
    for a, b in zip((kq, ks, vq, vs), snap):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- KVCache and decode

@pytest.mark.parametrize("kv_dtype,group", [("int8", None), ("int4", None), ("int4", 8)])
def test_kvcache_decode_reads_the_quantized_cache(kv_dtype, group):
    cache = fa_lab.KVCache(2, 2, 40, 16, kv_dtype=kv_dtype, group=group)
    k, v = _kv((2, 2, 29, 16), seed=1)
    assert cache.append(k[:, :, :20], v[:, :, :20]) == 20
    cache.append(k[:, :, 20:], v[:, :, 20:])
    assert cache.shape == (2, 2, 40, 16) and cache.kv_dtype == kv_dtype
    kq, ks, vq, vs = quantize_kv(k, v, bits=8 if kv_dtype == "int8" else 4, group=group)
    np.testing.assert_array_equal(cache.keys, dequantize_kv(kq, ks))
    np.testing.assert_array_equal(cache.values, dequantize_kv(vq, vs))
    assert not cache.keys.flags.writeable
    q = np.random.default_rng(2).standard_normal((2, 4, 3, 16)).astype(np.float32)
    out, lse = fa_lab.decode(q, cache, return_lse=True)
    for b in range(2):
        r, rl = reference.attention(q[b], cache.keys[b], cache.values[b], causal="bottom_right")
        np.testing.assert_allclose(out[b], r, atol=2e-6)
        np.testing.assert_allclose(lse[b], rl, atol=2e-5)
    per_token = bytes_per_token(16, kv_dtype=kv_dtype, group=group)
    assert cache.nbytes == 2 * 2 * 40 * per_token
    assert kv_dtype in repr(cache)


def test_tinylm_int8_cache_generates_the_float32_tokens():
    model = TinyLM()
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    tokens, _ = model.generate(prompt, 32)
    int8, _ = model.generate(prompt, 32, kv_dtype="int8")
    np.testing.assert_array_equal(int8, tokens)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bits=3), ValueError, "bits"), (dict(bits=True), ValueError, "bits"),
    (dict(group=0), ValueError, "group"), (dict(group=5), ValueError, "group"),
    (dict(group=2.0), TypeError, "group"), (dict(bits=4, group=3), ValueError, "even"),
    (dict(bogus=1), TypeError, "bogus")])
def test_quantize_kv_refuses_bad_arguments(kwargs, exc, match):
    k, v = _kv((1, 2, 12))
    with pytest.raises(exc, match=match):
        quantize_kv(k, v, **kwargs)


@pytest.mark.parametrize("bad,match", [
    ("nan", "finite"), ("int", "float"), ("masked", "masked"), ("1d", "shape"),
    ("lead", "leading")])
def test_quantize_kv_refuses_bad_arrays(bad, match):
    k, v = _kv((1, 4, 8))
    if bad == "nan":
        v[0, 1, 2] = np.nan
    elif bad == "int":
        k = k.astype(np.int32)
    elif bad == "masked":
        k = np.ma.masked_array(k)
    elif bad == "1d":
        k = k[0, 0]
    else:
        v = v[:, :3]
    with pytest.raises((TypeError, ValueError), match=match):
        quantize_kv(k, v)


def _cache():
    kq, ks, vq, vs = quantize_kv(*_kv((1, 2, 10, 16)))
    return np.ones((1, 2, 1, 16), np.float32), kq, ks, vq, vs


@pytest.mark.parametrize("case,exc,match", [
    ("no_scales", ValueError, "needs its scales"),
    ("float_with_scales", TypeError, "only int8"),
    ("mixed", TypeError, "one format"),
    ("q64", TypeError, "float32 queries"),
    ("scale_f64", TypeError, "k_scale must be float32"),
    ("scale_shape", ValueError, "v_scale must have shape"),
    ("window", NotImplementedError, "window"),
    ("flash", NotImplementedError, "format 'int8'"),
    ("readonly", ValueError, "writable"),
])
def test_attention_with_kvcache_refuses_bad_quantized_input(case, exc, match):
    q, kq, ks, vq, vs = _cache()
    kw = dict(cache_seqlens=5, k_scale=ks, v_scale=vs)
    k_cache, v_cache = kq, vq
    if case == "no_scales":
        kw.pop("k_scale"), kw.pop("v_scale")
    elif case == "float_with_scales":
        k_cache, v_cache = dequantize_kv(kq, ks), dequantize_kv(vq, vs)
    elif case == "mixed":
        v_cache = quantize_kv(*_kv((1, 2, 10, 16)), bits=4)[2]
        kw["v_scale"] = quantize_kv(*_kv((1, 2, 10, 16)), bits=4)[3]
    elif case == "q64":
        q = q.astype(np.float64)
    elif case == "scale_f64":
        kw["k_scale"] = ks.astype(np.float64)
    elif case == "scale_shape":
        kw["v_scale"] = vs[:, :, :5]
    elif case == "window":
        kw["window"] = (3, 0)
    elif case == "flash":
        kw["kernel"] = "flash"
    elif case == "readonly":
        ks.flags.writeable = False
        kw["k"], kw["v"] = _kv((1, 2, 1, 16))
    with pytest.raises(exc, match=match):
        fa_lab.attention_with_kvcache(q, k_cache, v_cache, **kw)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kv_dtype="int2"), ValueError, "kv_dtype"),
    (dict(kv_dtype="int8", dtype=np.float64), ValueError, "float32"),
    (dict(kv_dtype="float64"), ValueError, "does not match"),
    (dict(group=8), ValueError, "group and smooth_k apply"),
    (dict(smooth_k=True), ValueError, "group and smooth_k apply"),
    (dict(kv_dtype="int4", group=3), ValueError, "group"),
    (dict(kv_dtype="int8", bogus=1), TypeError, "bogus")])
def test_kvcache_refuses_bad_formats(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fa_lab.KVCache(1, 1, 4, 12, **kwargs)


def test_kvcache_quantized_append_refuses_non_finite_tokens_and_writes_nothing():
    cache = fa_lab.KVCache(1, 1, 4, 8, kv_dtype="int8")
    k = np.ones((1, 1, 2, 8), np.float32)
    k[0, 0, 1, 3] = np.inf
    with pytest.raises(ValueError, match="k_new must be finite"):
        cache.append(k, np.ones_like(k))
    assert cache.length == 0 and not cache.k.any()


# ---------------------------------------------------------------- smoothed keys

def test_smoothed_keys_give_the_same_attention_and_lse():
    rng = np.random.default_rng(11)
    k, v = _kv((2, 2, 60, 32), seed=12, offset=3.0)
    q = rng.standard_normal((2, 4, 2, 32)).astype(np.float32)
    kq, ks, vq, vs, km = quantize_kv(k, v, bits=4, group=16, smooth_k=True)
    assert km.shape == (2, 2, 32) and km.dtype == np.float32
    np.testing.assert_allclose(km, k.mean(axis=2), atol=1e-5)
    kd, vd = dequantize_kv(kq, ks) + km[:, :, None], dequantize_kv(vq, vs)
    lens = np.array([60, 17])
    (exp, base) = _expected(q, kd, vd, lens, True)
    out, lse = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks,
                                             v_scale=vs, k_mean=km, return_lse=True)
    _check(out, lse, exp, base, q, kd, vd)
    # smoothing is what makes int4 usable on keys with per-channel offsets
    plain = quantize_kv(k, v, bits=4, group=16)
    kp = dequantize_kv(plain[0], plain[1])
    err = [np.abs(x - k).mean() for x in (kp, kd)]
    assert err[1] < err[0] / 2


def test_kvcache_smooth_k_keeps_the_prompt_mean_until_reset():
    cache = fa_lab.KVCache(1, 2, 30, 16, kv_dtype="int4", group=8, smooth_k=True)
    k, v = _kv((1, 2, 25, 16), seed=5, offset=2.0)
    cache.append(k[:, :, :20], v[:, :, :20])
    mean = cache.k_mean.copy()
    np.testing.assert_allclose(mean, k[:, :, :20].mean(axis=2), atol=1e-5)
    cache.append(k[:, :, 20:], v[:, :, 20:])
    np.testing.assert_array_equal(cache.k_mean, mean)
    q = np.random.default_rng(1).standard_normal((1, 4, 1, 16)).astype(np.float32)
    out, lse = fa_lab.decode(q, cache, return_lse=True)
    r, rl = reference.attention(q[0], cache.keys[0], cache.values[0], causal="bottom_right")
    np.testing.assert_allclose(out[0], r, atol=2e-6)
    np.testing.assert_allclose(lse[0], rl, atol=2e-5)
    assert np.abs(cache.keys - k).max() < 0.5 and "smooth_k=True" in repr(cache)
    cache.reset()
    assert cache.k_mean is None


@pytest.mark.parametrize("case,match", [("float", "only to a quantized"),
                                        ("shape", "k_mean must be float32 of shape"),
                                        ("nan", "finite")])
def test_k_mean_refuses_bad_input(case, match):
    q, kq, ks, vq, vs = _cache()
    mean = np.zeros((1, 2, 16), np.float32)
    kw = dict(k_scale=ks, v_scale=vs)
    if case == "float":
        kq, vq, kw = dequantize_kv(kq, ks), dequantize_kv(vq, vs), {}
    elif case == "shape":
        mean = mean[:, :1]
    else:
        mean[0, 1, 3] = np.nan
    with pytest.raises(ValueError, match=match):
        fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=4, k_mean=mean, **kw)


# ---------------------------------------------------------------- code generation

@pytest.mark.parametrize("fmt,expect", [
    ("int8", ("vpmovsxbd", "vcvtdq2ps", "vfmadd", "prefetcht0")),
    ("int4", ("vpmovzxbd", "vpsll", "vpsrad", "vcvtdq2ps", "vfmadd", "prefetcht0"))])
def test_the_vector_scores_dequantize_in_registers(fmt, expect):
    """The int8 / int4 rows are widened, converted and multiplied in zmm registers (no
    float copy of the tile), and the next rows are prefetched."""
    from fa_lab.kernels.probes.assembly import assembly

    k, v = _kv((1, 1, 8, 32))
    kq, ks, vq, vs = quantize_kv(k, v, bits=8 if fmt == "int8" else 4)
    Qf = np.ones(4 * 32, np.float32)
    S = np.zeros((4, 8), np.float32)
    asm = assembly(kvtiles.vscores, args=(Qf, 32, kq[0, 0], ks[0, 0], 32, S, vq[0, 0]))
    missing = [op for op in expect if op not in asm]
    assert not missing, f"{fmt}: {missing} not in the assembly"
    assert "zmm" in asm or "ymm" in asm


# ---------------------------------------------------------------- lesson 14's exercises

def test_the_exercises_accept_the_solutions_and_read_wrong_answers():
    from fa_lab.lessons import kv_exercises as ex

    assert ex.check("cache_gib", None).startswith("not yet")
    assert ex.check("cache_gib", 32 * 8 * 131072 * 264 / 2**30).startswith("right")
    assert "scales" in ex.check("cache_gib", 8.0)
    assert "factor" in ex.check("cache_gib", 16.5)
    assert ex.check("int4_byte", ((1, -2.0), (5, -3.5))).startswith("right")
    assert "channels" in ex.check("int4_byte", ((1, -2.0), (2, -3.5)))
    assert "values" in ex.check("int4_byte", ((1, 6.0), (5, 4.5)))
    assert "answer" in ex.check("int4_byte", 3)
    with pytest.raises(ValueError, match="name"):
        ex.check("nope", 1)


def test_the_lessons_byte_tables_are_counted_from_the_format():
    from fa_lab.tools import kvquant as kvq

    table = kvq.format_table(d=128).set_index("format")
    assert table.loc["float32", "bytes_per_token_head"] == 1024
    assert table.loc["int8", "bytes_per_token_head"] == 264
    assert table.loc["int4 g32", "bytes_per_token_head"] == 128 + 4 * 4 * 2
    sizes = kvq.model_cache_sizes(contexts=(131072,)).set_index("format")
    assert sizes.loc["float32", "128k tokens (GiB)"] == 32.0


# ---------------------------------------------------------------- the VNNI variant

VNNI = quantized.vnni_unavailable()


@pytest.mark.skipif(VNNI is not None, reason=str(VNNI))
@pytest.mark.parametrize("H,H_kv,Nq,d", [(8, 2, 1, 128), (3, 1, 2, 64), (6, 2, 3, 64)])
def test_vnni_variant_matches_float64(H, H_kv, Nq, d):
    """Queries quantized per row: not exact, so judged by cosine (as the INT8 kernels)."""
    k, v = _kv((2, H_kv, 200, d), seed=d)
    q = np.random.default_rng(H).standard_normal((2, H, Nq, d)).astype(np.float32)
    kq, ks, vq, vs = quantize_kv(k, v)
    lens = np.array([200, 71])
    exp, _ = _expected(q, dequantize_kv(kq, ks), dequantize_kv(vq, vs), lens, True)
    for splits in (None, 3):
        out, lse = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks,
                                                 v_scale=vs, kernel="quantized_vnni",
                                                 splits=splits, return_lse=True)
        a, b = out.ravel().astype(np.float64), exp[0].ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9999
        np.testing.assert_allclose(lse, exp[1], atol=0.05)


@pytest.mark.skipif(VNNI is not None, reason=str(VNNI))
@pytest.mark.parametrize("case,match", [("int4", "format 'int4'"),
                                        ("groups", "one scale per token"),
                                        ("d", "d % 64"), ("dv", "d_v % 32")])
def test_vnni_variant_refuses_what_it_cannot_read(case, match):
    d, d_v, bits, group = 64, 64, 8, None
    if case == "int4":
        bits = 4
    elif case == "groups":
        group = 32
    elif case == "d":
        d = d_v = 48
    else:
        d_v = 40
    k, v = _kv((1, 1, 20, d), d_v=d_v)
    kq, ks, vq, vs = quantize_kv(k, v, bits=bits, group=group)
    q = np.ones((1, 2, 1, d), np.float32)
    with pytest.raises(NotImplementedError, match=match):
        fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=20, k_scale=ks, v_scale=vs,
                                      kernel="quantized_vnni")


def test_vnni_variant_is_refused_without_vnni():
    """The choice logic, on any CPU: with VNNI removed the kernel says why."""
    from fa_lab.settings import cpu_features

    kq, ks, vq, vs = quantize_kv(*_kv((1, 1, 20, 64)))
    with cpu_features.forced(vnni=False):
        with pytest.raises(NotImplementedError, match="VNNI"):
            fa_lab.attention_with_kvcache(np.ones((1, 1, 1, 64), np.float32), kq, vq,
                                          cache_seqlens=20, k_scale=ks, v_scale=vs,
                                          kernel="quantized_vnni")


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, None)])
def test_a_one_token_cache_reads_its_scales(bits, group):
    """Scales of shape (1, H_kv, 1, G) (B = 1, one token) are real scales, not the float
    cache's placeholder."""
    k, v = _kv((1, 2, 1, 32), seed=3)
    q = np.random.default_rng(3).standard_normal((1, 4, 1, 32)).astype(np.float32)
    kq, ks, vq, vs = quantize_kv(k, v, bits=bits, group=group)
    ref = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=1, k_scale=ks, v_scale=vs,
                                        kernel="reference")
    out = fa_lab.attention_with_kvcache(q, kq, vq, cache_seqlens=1, k_scale=ks, v_scale=vs)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    cache = fa_lab.KVCache(1, 2, 1, 32, kv_dtype=f"int{bits}", group=group)
    cache.append(k, v)
    np.testing.assert_allclose(fa_lab.decode(q, cache), ref, atol=2e-6)


def test_bad_blocks_are_refused_before_anything_is_written():
    kq, ks, vq, vs = quantize_kv(*_kv((1, 1, 8, 16)))
    snap = [x.copy() for x in (kq, ks, vq, vs)]
    kn, vn = _kv((1, 1, 1, 16))
    for bad in ("a", -1, 2.5):
        with pytest.raises((TypeError, ValueError), match="block_kv"):
            fa_lab.attention_with_kvcache(np.ones((1, 1, 1, 16), np.float32), kq, vq,
                                          cache_seqlens=3, k=kn, v=vn, k_scale=ks, v_scale=vs,
                                          block_kv=bad)
    for a, b in zip((kq, ks, vq, vs), snap):
        np.testing.assert_array_equal(a, b)


def test_tokens_too_small_for_a_float32_scale_are_stored_as_zeros():
    k = np.full((1, 2, 8), 1e-44, np.float32)
    kq, ks, _, _ = quantize_kv(k, k)
    assert np.all(kq == 0) and np.all(ks == 1)
    cache = fa_lab.KVCache(1, 1, 2, 8, kv_dtype="int8")  # 1e-44 / 127 underflows float32
    cache.append(k[None], k[None])
    assert cache.length == 2 and np.all(cache.keys == 0)
    with pytest.raises(ValueError, match="overflows float32"):
        quantize_kv(np.full((1, 8), 1e300), np.ones((1, 8)))


def test_a_refused_first_append_leaves_a_smoothed_cache_unchanged():
    cache = fa_lab.KVCache(1, 1, 4, 8, kv_dtype="int8", smooth_k=True)
    k = np.ones((1, 1, 2, 8), np.float32)
    k[0, 0, 1, 2] = np.inf
    with pytest.raises(ValueError, match="k_new must be finite"):
        cache.append(k, np.ones_like(k))
    assert cache.length == 0 and cache.k_mean is None
