"""Bad input gets a ValueError/TypeError naming the argument and what was expected."""

import numpy as np
import pytest

import fa_lab

from conftest import NUMBA_KERNELS

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
KV = rng.standard_normal((2, 2, 6, 8)).astype(np.float32)


def call(q=Q, k=KV, v=KV, **kw):
    return fa_lab.attention(q, k, v, **kw)


@pytest.mark.parametrize("q, k, v, match", [
    (Q[0, 0, 0], KV, KV, r"q must have shape \(\.\.\., H, Nq, d\)"),
    (Q, KV[0], KV, "k must have the same rank as q"),
    (Q, KV, KV[0], "v must have the same rank as q"),
    (Q, KV, KV[:, :, :5], r"v must have k's shape .* except its head dimension d_v"),
    (Q, KV, KV[..., :0], r"d_v \(>= 1"),
    (Q, KV[..., :4], KV[..., :4], "k must have the head dimension d=8"),
    (Q[..., :0], KV[..., :0], KV[..., :0], "head dimension d >= 1"),
    (Q, KV[:1], KV[:1], "leading dims"),
    (Q, np.concatenate([KV, KV[:, :1]], 1), np.concatenate([KV, KV[:, :1]], 1),
     r"H=4.*H_kv=3"),
])
def test_shape_errors(q, k, v, match):  # (a different d_v alone is MLA: test_mla.py)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


@pytest.mark.parametrize("bad", [Q.astype(np.int32), Q.astype(np.complex64),
                                 Q.astype(object), Q > 0])
def test_dtype_errors_name_q(bad):
    with pytest.raises(TypeError, match="q must be a float32 or float64 array"):
        call(q=bad)


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="share one dtype"):
        call(k=KV.astype(np.float64), v=KV.astype(np.float64))


@pytest.mark.parametrize("name, value, exc", [
    ("block_q", 0, ValueError), ("block_q", -3, ValueError), ("block_kv", 0, ValueError),
    ("block_q", 2.5, TypeError), ("block_kv", "8", TypeError), ("block_q", True, TypeError),
])
def test_block_size_errors(name, value, exc):
    with pytest.raises(exc, match=name):
        call(kernel="tiled_simd", **{name: value})


@pytest.mark.parametrize("mask, exc, match", [
    (np.ones((5, 7), bool), ValueError, r"mask of shape \(5, 7\) does not broadcast"),
    (np.ones((3, 4, 5, 6), bool), ValueError, "does not broadcast"),
    (np.ones((1, 2, 4, 5, 6), bool), ValueError, "does not broadcast"),  # would grow out
    (np.ones((5, 6), np.int64), TypeError, "mask must be a bool or float array"),
])
def test_mask_errors(mask, exc, match):
    with pytest.raises(exc, match=match):
        call(mask=mask)


def test_unknown_kernel_lists_the_registry():
    with pytest.raises(ValueError, match=r"kernel must be 'auto' or one of \[.*tiled_simd"):
        call(kernel="flash9000")
    with pytest.raises(TypeError, match="kernel must be a str"):
        call(kernel=3)


@pytest.mark.parametrize("causal", ["yes", 1.0, "diagonal"])
def test_bad_causal(causal):
    with pytest.raises(ValueError, match="causal must be"):
        call(causal=causal)


def test_bad_scale():
    with pytest.raises(TypeError, match="scale must be a real number"):
        call(scale="0.1")


@pytest.mark.parametrize("kernel", [n for n in NUMBA_KERNELS if not fa_lab.KERNELS[n].tiled]
                         + ["reference"])
def test_untiled_kernels_refuse_block_sizes_by_name(kernel):
    with pytest.raises(NotImplementedError, match=f"kernel '{kernel}' is not tiled"):
        call(kernel=kernel, block_q=16)


def test_unsupported_option_is_named_and_auto_falls_back_with_a_reason(monkeypatch):
    import dataclasses

    top = fa_lab.ladder()[-1]
    monkeypatch.setitem(fa_lab.KERNELS, top.name, dataclasses.replace(top, mask=False))
    with pytest.raises(NotImplementedError, match=f"{top.name}.*does not support mask"):
        call(kernel=top.name, mask=np.ones((5, 6), bool))
    with pytest.warns(fa_lab.KernelFallbackWarning, match="does not support mask"):
        out = call(mask=np.ones((5, 6), bool))
    np.testing.assert_allclose(out, call(kernel="reference"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- hostile inputs

def test_a_torch_tensor_is_refused_with_the_way_to_the_torch_adapter():
    torch = pytest.importorskip("torch", reason="optional")
    t = torch.from_numpy(Q)
    for args, name in (((t, KV, KV), "q"), ((Q, torch.from_numpy(KV), KV), "k")):
        with pytest.raises(TypeError, match=f"{name} is a torch tensor: use "
                           "fa_lab.integrations.torch.attention"):
            fa_lab.attention(*args)


def test_a_ragged_list_names_its_argument():
    with pytest.raises(ValueError, match="q must be a rectangular array"):
        fa_lab.attention([[1.0, 2.0], [3.0]], [[1.0, 2.0]], [[1.0, 2.0]])


def test_flash_attn_layout_is_a_keyword_and_a_hint():
    q = np.ascontiguousarray(Q.transpose(0, 2, 1, 3))  # (B, N, H, d)
    k = np.ascontiguousarray(KV.transpose(0, 2, 1, 3))
    out, lse = fa_lab.attention(q, k, k, layout="bnhd", causal=True, return_lse=True)
    ref, ref_lse = fa_lab.attention(Q, KV, KV, causal=True, return_lse=True)
    np.testing.assert_array_equal(out, ref.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(lse, ref_lse)
    with pytest.raises(ValueError, match="layout='bnhd'"):  # read as (B, H, N, d): 5 % 6
        fa_lab.attention(q, k, k)
    with pytest.raises(ValueError, match="layout must be one of"):
        fa_lab.attention(Q, KV, KV, layout="bshd")
    with pytest.raises(ValueError, match="layout='bnhd' needs"):
        fa_lab.attention(Q[0, 0], KV[0, 0], KV[0, 0], layout="bnhd")


def test_documented_clamps_and_casts():
    # quantize: a block of more rows than there are is one group of all of them
    x = rng.standard_normal((1, 2, 10, 8)).astype(np.float32)
    for a, b in zip(fa_lab.quantize(x, "per_block", 64), fa_lab.quantize(x, "per_block", 10)):
        np.testing.assert_array_equal(a, b)
    # decode: more key splits than key blocks are clamped to the blocks (documented)
    cache = fa_lab.KVCache(1, 2, 64, 8)
    cache.append(KV[:1, :, :6], KV[:1, :, :6])
    q1 = Q[:1, :, :1]
    np.testing.assert_array_equal(fa_lab.decode(q1, cache, splits=10 ** 9),
                                  fa_lab.decode(q1, cache, splits=1))
    # KVCache: float16 fits a float32 cache without loss (np.can_cast 'safe'); float64 not
    cache.append(KV[:1, :, :1].astype(np.float16), KV[:1, :, :1].astype(np.float16))
    assert cache.length == 7 and cache.k.dtype == np.float32
    with pytest.raises(TypeError, match="does not fit the cache"):
        cache.append(KV[:1, :, :1].astype(np.float64), KV[:1, :, :1].astype(np.float64))
