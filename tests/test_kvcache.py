"""attention_with_kvcache: contiguous and paged caches with ragged lengths against the
float64 reference of the gathered keys; in-place appends; capacity errors write nothing;
a permuted block table (pages permuted alike) changes nothing."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fa_lab
from fa_lab.numerics import reference
from fa_lab.kernels.ladder.flash import plan_splits
from fa_lab.features.kvcache import paginate
from fa_lab.registry import KVCACHE_KERNELS, Request
from fa_lab.numerics.testing import assert_close, lse_magnitude

SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])


@pytest.fixture(params=[k for k, kern in KVCACHE_KERNELS.items() if "float" in kern.kv_formats])
def ckernel(request):
    """The kernels that read float caches (int8 / int4 ones: test_kvquant)."""
    return request.param


def _setup(B=3, H=4, H_kv=2, S=90, d=7, Nq=2, Nnew=2, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    kc = rng.standard_normal((B, H_kv, S, d)).astype(dtype)
    vc = rng.standard_normal((B, H_kv, S, d)).astype(dtype)
    q = rng.standard_normal((B, H, Nq, d)).astype(dtype)
    kn = rng.standard_normal((B, H_kv, Nnew, d)).astype(dtype)
    vn = rng.standard_normal((B, H_kv, Nnew, d)).astype(dtype)
    return q, kc, vc, kn, vn


def _serves(kernel, dtype=np.float32, **mods):
    """Skip (with the kernel's own reason) a float-cache case the kernel refuses by design:
    the "quantized" kernel is float32 only and has no window, softcap or ALiBi (its
    refusals are tested in test_kvquant)."""
    req = Request(dtype=np.dtype(dtype), causal=True, gqa=True,
                  window="window" in mods, softcap="softcap" in mods,
                  alibi="alibi_slopes" in mods)
    reason = KVCACHE_KERNELS[kernel].unsupported(req)
    if reason:
        pytest.skip(reason)


def _blocks(kernel, bq=None, bk=None):
    return {"block_q": bq, "block_kv": bk} if KVCACHE_KERNELS[kernel].tiled and bq else {}


def expected(q, kc, vc, lens, kn=None, vn=None, causal=True, **opts):
    """The float64 reference per sequence on the appended contiguous keys."""
    outs, lses, base_o, base_l = [], [], [], []
    for b in range(q.shape[0]):
        k_b, v_b = kc[b, :, :lens[b]], vc[b, :, :lens[b]]
        if kn is not None:
            k_b, v_b = np.concatenate([k_b, kn[b]], 1), np.concatenate([v_b, vn[b]], 1)
        per = dict(opts)
        if np.ndim(opts.get("alibi_slopes")) == 2:
            per["alibi_slopes"] = opts["alibi_slopes"][b]
        c = "bottom_right" if causal else False
        for dtype, o_list, l_list in ((np.float64, outs, lses),
                                      (q.dtype.type, base_o, base_l)):
            o, l = reference.attention(q[b], k_b, v_b, causal=c, dtype=dtype, **per)
            o_list.append(o)
            l_list.append(l)
    return (np.stack(outs), np.stack(lses)), (np.stack(base_o), np.stack(base_l))


def check(out, lse, exp, base, q, kc):
    assert_close(out, exp[0], baseline=base[0], magnitude=np.abs(kc).max() * 2)
    assert_close(lse, exp[1], baseline=base[1], what="lse",
                 magnitude=lse_magnitude(exp[1], q, kc) + 2)


@pytest.mark.parametrize("lens", [[5, 60, 0], [88, 1, 40]], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, 7, 32], ids=["contiguous", "page7", "page32"])
def test_against_reference(ckernel, dtype, lens, causal, paged):
    _serves(ckernel, dtype)
    q, kc, vc, kn, vn = _setup(dtype=dtype)
    lens = np.array(lens, np.int32)
    exp, base = expected(q, kc, vc, lens, kn, vn, causal)
    if paged:
        kp, vp, table = paginate(kc, vc, paged, num_blocks=60, rng=np.random.default_rng(1))
        out, lse = fa_lab.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, k=kn, v=vn,
                                                 block_table=table, causal=causal,
                                                 kernel=ckernel, return_lse=True,
                                                 **_blocks(ckernel, 2, 5))
    else:
        out, lse = fa_lab.attention_with_kvcache(q, kc.copy(), vc.copy(), cache_seqlens=lens,
                                                 k=kn, v=vn, causal=causal, kernel=ckernel,
                                                 return_lse=True, **_blocks(ckernel, 2, 5))
    check(out, lse, exp, base, q, kc)


@pytest.mark.parametrize("opts", [dict(window=(10, 0)), dict(softcap=2.0),
                                  dict(alibi_slopes=SLOPES),
                                  dict(window=(30, 2), softcap=3.0,
                                       alibi_slopes=np.outer([1, 2, 3], SLOPES))], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_modifiers(ckernel, opts, causal):
    _serves(ckernel, **opts)
    q, kc, vc, kn, vn = _setup(Nq=5, Nnew=3, seed=2)
    lens = np.array([40, 2, 70], np.int32)
    exp, base = expected(q, kc, vc, lens, kn, vn, causal, **opts)
    kp, vp, table = paginate(kc, vc, 16, rng=np.random.default_rng(3))
    out, lse = fa_lab.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, k=kn, v=vn,
                                             block_table=table, causal=causal, kernel=ckernel,
                                             return_lse=True, **opts, **_blocks(ckernel, 2, 8))
    check(out, lse, exp, base, q, kc)


def test_split_kv_decode_over_a_long_paged_cache(dtype):
    q, kc, vc, _, _ = _setup(B=1, H=2, H_kv=1, S=5000, d=32, Nq=1, seed=4, dtype=dtype)
    lens = np.array([4711], np.int32)
    assert plan_splits(1, 2, 1, 4711, 1, 256, 2) > 1
    kp, vp, table = paginate(kc, vc, 256, rng=np.random.default_rng(5))
    out, lse = fa_lab.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table,
                                             return_lse=True, window=(1000, 0))
    exp, base = expected(q, kc, vc, lens, window=(1000, 0))
    check(out, lse, exp, base, q, kc)


def test_append_writes_in_place_contiguous_and_paged():
    q, kc, vc, kn, vn = _setup(Nnew=4, seed=6)
    lens = np.array([0, 30, 86], np.int32)
    kp, vp, table = paginate(kc, vc, 8, rng=np.random.default_rng(7))
    k2, v2 = kc.copy(), vc.copy()
    fa_lab.attention_with_kvcache(q, k2, v2, cache_seqlens=lens, k=kn, v=vn)
    fa_lab.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, k=kn, v=vn,
                                  block_table=table)
    for b, L in enumerate(lens):
        np.testing.assert_array_equal(k2[b, :, L:L + 4], kn[b])
        np.testing.assert_array_equal(v2[b, :, L:L + 4], vn[b])
        np.testing.assert_array_equal(k2[b, :, :L], kc[b, :, :L])  # nothing else moved
        for t in range(4):
            page, row = table[b, (L + t) // 8], (L + t) % 8
            np.testing.assert_array_equal(kp[page, :, row], kn[b, :, t])
            np.testing.assert_array_equal(vp[page, :, row], vn[b, :, t])


def test_capacity_error_writes_nothing():
    q, kc, vc, kn, vn = _setup(Nnew=4, seed=8)
    k2, v2 = kc.copy(), vc.copy()
    with pytest.raises(ValueError, match="sequence 2 would hold 91 tokens.*capacity of 90"):
        fa_lab.attention_with_kvcache(q, k2, v2, cache_seqlens=np.array([0, 3, 87]), k=kn,
                                      v=vn)
    np.testing.assert_array_equal(k2, kc)
    np.testing.assert_array_equal(v2, vc)
    kp, vp, table = paginate(kc, vc, 8)
    kp0 = kp.copy()
    bad = table.copy()
    bad[1, 1] = 999  # sequence 1 (3 + 4 = 7 tokens... 12 after) points outside the pool
    with pytest.raises(ValueError, match=r"block_table\[1\] points outside"):
        fa_lab.attention_with_kvcache(q, kp, vp, cache_seqlens=np.array([0, 8, 9]), k=kn,
                                      v=vn, block_table=bad)
    np.testing.assert_array_equal(kp, kp0)


def test_empty_sequence_gives_zeros_and_neg_inf():
    q, kc, vc, _, _ = _setup(seed=9)
    out, lse = fa_lab.attention_with_kvcache(q, kc, vc, cache_seqlens=np.array([0, 5, 0]),
                                             return_lse=True)
    assert np.all(out[[0, 2]] == 0) and np.all(np.isneginf(lse[[0, 2]]))
    assert np.isfinite(lse[1]).all()


def test_int_cache_seqlens_and_decode_agree():
    # a KVCache + decode step equals the same step through attention_with_kvcache
    q, kc, vc, kn, vn = _setup(B=2, H=4, H_kv=2, S=64, d=8, Nq=1, Nnew=1, seed=10)
    cache = fa_lab.KVCache(2, 2, 64, 8)
    cache.append(kc[:, :, :20], vc[:, :, :20])
    cache.append(kn, vn)
    want = fa_lab.decode(q, cache)
    got = fa_lab.attention_with_kvcache(q, kc.copy(), vc.copy(), cache_seqlens=20, k=kn, v=vn)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), page=st.sampled_from([3, 8, 16]),
       lens=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       causal=st.booleans(), Nq=st.integers(1, 4))
def test_permuting_the_block_table_and_pages_alike_changes_nothing(seed, page, lens, causal,
                                                                   Nq):
    B = len(lens)
    q, kc, vc, _, _ = _setup(B=B, H=2, H_kv=1, S=40, d=5, Nq=Nq, seed=seed)
    lens = np.array(lens)
    kp, vp, table = paginate(kc, vc, page, num_blocks=B * -(-40 // page) + 3)
    a = fa_lab.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table,
                                      causal=causal, return_lse=True)
    perm = np.random.default_rng(seed).permutation(kp.shape[0])  # new page p = old perm[p]
    where = np.argsort(perm)  # old page i now lives at where[i]
    b = fa_lab.attention_with_kvcache(q, kp[perm], vp[perm], cache_seqlens=lens,
                                      block_table=where[table], causal=causal,
                                      return_lse=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # ...and the paged cache equals the contiguous one it was cut from
    c = fa_lab.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=causal,
                                      return_lse=True, block_kv=page)
    np.testing.assert_allclose(a[0], c[0], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(cache_seqlens=np.array([1, 2])), ValueError, r"cache_seqlens must be an int or"),
    (dict(cache_seqlens=np.array([1.0, 2, 3])), TypeError, "cache_seqlens must be an integer"),
    (dict(cache_seqlens=-1), ValueError, "cache_seqlens must be >= 0"),
    (dict(cache_seqlens=3, block_table=np.zeros((2, 3), np.int32)), ValueError,
     r"block_table must have shape \(3, max_blocks\)"),
    (dict(cache_seqlens=3, block_table=np.zeros((3, 3))), TypeError,
     "block_table must be an integer array"),
    (dict(cache_seqlens=3, k=np.zeros((3, 2, 1, 7), np.float32)), ValueError,
     "k and v must be given together"),
    (dict(cache_seqlens=3, k=np.zeros((3, 2, 1, 6), np.float32),
          v=np.zeros((3, 2, 1, 6), np.float32)), ValueError, "k and v must have shape"),
    (dict(cache_seqlens=3, softcap=-1.0), ValueError, "softcap"),
    (dict(cache_seqlens=3, causal="bottom_right"), TypeError, "causal must be a bool"),
])
def test_errors(kw, exc, match):
    q, kc, vc, _, _ = _setup()
    with pytest.raises(exc, match=match):
        fa_lab.attention_with_kvcache(q, kc, vc, **kw)


def test_cache_errors():
    q, kc, vc, kn, vn = _setup()
    with pytest.raises(ValueError, match="contiguous k_cache must have B=3 rows"):
        fa_lab.attention_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=1)
    with pytest.raises(TypeError, match="caches must have q's dtype"):
        fa_lab.attention_with_kvcache(q, kc.astype(np.float64), vc.astype(np.float64),
                                      cache_seqlens=1)
    with pytest.raises(TypeError, match="k_cache must be a numpy array to be written"):
        fa_lab.attention_with_kvcache(q, kc.tolist(), vc, cache_seqlens=1, k=kn, v=vn)
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="must be writable"):
        fa_lab.attention_with_kvcache(q, ro, vc, cache_seqlens=1, k=kn, v=vn)
