"""Attention sinks (gpt-oss, StreamingLLM) and a value head dimension d_v != d (MLA) in
every kernel and entry point that serves them, against the float64 reference (which
writes the sink out as one more score column), plus gradients and bad input."""

import numpy as np
import pytest

import fa_lab
from fa_lab.features.kvcache import paginate
from fa_lab.features.varlen import pack
from fa_lab.numerics import reference
from fa_lab.numerics.testing import (AWKWARD_CASES, assert_close, lse_magnitude,
                                     numerical_grads)

from conftest import block_kwargs


def _sinks(H, seed=5):
    return np.random.default_rng(seed).standard_normal(H) * 2


def _check(out, lse, q, k, v, exp, base, what):
    exp_out, exp_lse = exp
    assert_close(out, exp_out, baseline=base[0], what=f"{what} out",
                 magnitude=np.max(np.abs(v), initial=0.0))
    assert_close(lse, exp_lse, baseline=base[1], what=f"{what} lse",
                 magnitude=lse_magnitude(exp_lse, q, k) + 10)


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=lambda c: c.id)
def test_sinks_in_every_kernel(case, kernel):
    q, k, v = case.inputs(np.float32, seed=2)
    s = _sinks(case.H)
    exp = reference.attention(q, k, v, causal=case.causal, sinks=s)
    base = reference.attention(q, k, v, causal=case.causal, sinks=s, dtype=np.float32)
    out, lse = fa_lab.attention(q, k, v, causal=case.causal, sinks=s, kernel=kernel,
                                return_lse=True, **block_kwargs(kernel, case.block_q, case.block_kv))
    _check(out, lse, q, k, v, exp, base, kernel)


DV_KERNELS = [n for n, k in fa_lab.KERNELS.items() if k.dv]


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", DV_KERNELS)
def test_value_head_dim_differs_from_d(case, name):
    q, k, _ = case.inputs(np.float32, seed=3)
    d_v = 5 if case.d != 5 else 3
    v = np.random.default_rng(4).standard_normal(k.shape[:-1] + (d_v,)).astype(np.float32)
    exp = reference.attention(q, k, v, causal=case.causal)
    base = reference.attention(q, k, v, causal=case.causal, dtype=np.float32)
    out, lse = fa_lab.attention(q, k, v, causal=case.causal, kernel=name, return_lse=True,
                                **block_kwargs(name, case.block_q, case.block_kv))
    assert out.shape == q.shape[:-1] + (d_v,)
    _check(out, lse, q, k, v, exp, base, name)


def test_teaching_rungs_refuse_dv_by_name_and_auto_skips_nothing():
    q = np.zeros((1, 2, 4, 8), np.float32)
    k, v = np.zeros((1, 2, 6, 8), np.float32), np.zeros((1, 2, 6, 3), np.float32)
    for name in set(fa_lab.KERNELS) - set(DV_KERNELS):
        with pytest.raises(NotImplementedError, match="value head dimension d_v"):
            fa_lab.attention(q, k, v, kernel=name)
    assert fa_lab.plan(q, k, v)["kernel"] == "flash"


def test_a_fully_masked_row_with_a_sink_is_zero_with_the_sinks_lse():
    q, k, v = (np.ones((1, 2, 3, 4), np.float32) for _ in range(3))
    mask = np.ones((3, 3), bool)
    mask[1] = False
    s = np.array([0.5, -1.0])
    for name in fa_lab.KERNELS:
        out, lse = fa_lab.attention(q, k, v, mask=mask, sinks=s, kernel=name, return_lse=True)
        assert np.all(out[:, :, 1] == 0) and np.allclose(lse[0, :, 1], s), name
    out, lse = fa_lab.attention(q, k, v, sinks=np.array([-np.inf, -np.inf]), return_lse=True)
    ref_out, ref_lse = fa_lab.attention(q, k, v, return_lse=True)  # -inf: no sink
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(lse, ref_lse)


def test_sinks_and_dv_in_varlen_and_the_kv_cache():
    rng = np.random.default_rng(0)
    H, H_kv, d, d_v = 4, 2, 24, 16
    s = _sinks(H)
    seqs = [(n, m) for n, m in ((3, 5), (9, 9), (1, 4), (0, 2))]
    qs = [rng.standard_normal((n, H, d)).astype(np.float32) for n, _ in seqs]
    ks = [rng.standard_normal((m, H_kv, d)).astype(np.float32) for _, m in seqs]
    vs = [rng.standard_normal((m, H_kv, d_v)).astype(np.float32) for _, m in seqs]
    (Q, cq), (K, ck), (V, _) = pack(qs), pack(ks), pack(vs)
    for name in fa_lab.registry.VARLEN_KERNELS:
        out, lse = fa_lab.attention_varlen(Q, K, V, cq, ck, causal=True, sinks=s, kernel=name,
                                           return_lse=True)
        for b in range(len(seqs)):
            t = lambda x: x.transpose(1, 0, 2)  # noqa: E731
            r, rl = reference.attention(t(qs[b]), t(ks[b]), t(vs[b]), causal=True, sinks=s)
            np.testing.assert_allclose(t(out[cq[b]:cq[b + 1]]), r, atol=2e-6)
            np.testing.assert_allclose(lse[:, cq[b]:cq[b + 1]], rl, atol=2e-5)
    q = rng.standard_normal((3, H, 2, d)).astype(np.float32)
    kc = rng.standard_normal((3, H_kv, 600, d)).astype(np.float32)
    vc = rng.standard_normal((3, H_kv, 600, d_v)).astype(np.float32)
    lens = np.array([5, 600, 170])
    kp, vp, table = paginate(kc, vc, 64, rng=rng)
    for splits in (1, 4):
        for kernel in [k for k, kern in fa_lab.registry.KVCACHE_KERNELS.items()
                       if "float" in kern.kv_formats]:  # int8 / int4 caches: test_kvquant
            for args in ((kc, vc, None), (kp, vp, table)):
                out = fa_lab.attention_with_kvcache(q, args[0], args[1], cache_seqlens=lens,
                                                    block_table=args[2], sinks=s,
                                                    splits=splits if kernel == "flash" else None,
                                                    kernel=kernel)
                for b in range(3):
                    r, _ = reference.attention(q[b], kc[b, :, :lens[b]], vc[b, :, :lens[b]],
                                               causal="bottom_right", sinks=s)
                    np.testing.assert_allclose(out[b], r, atol=2e-6)


def test_the_split_kv_path_serves_dv_and_sinks():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 1, 24)).astype(np.float32)
    k = rng.standard_normal((1, 2, 3000, 24)).astype(np.float32)
    v = rng.standard_normal((1, 2, 3000, 16)).astype(np.float32)
    s = _sinks(2)
    call = fa_lab.api.prepare(q, k, v, causal="bottom_right", sinks=s)
    out, lse = call.run("flash", splits=5)
    r, rl = reference.attention(q, k, v, causal="bottom_right", sinks=s)
    np.testing.assert_allclose(out, r, atol=1e-6)
    np.testing.assert_allclose(lse, rl, atol=1e-5)


def test_sinks_in_int8_attention_use_the_true_lse():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 64, 32)).astype(np.float32)
    k = (rng.standard_normal((1, 2, 64, 32)) + 3).astype(np.float32)  # smoothing shifts the LSE
    v = rng.standard_normal((1, 2, 64, 32)).astype(np.float32)
    s = _sinks(4)
    r, rl = reference.attention(q, k, v, sinks=s)
    for name in fa_lab.INT8_KERNELS:
        try:
            out, lse = fa_lab.attention_int8(q, k, v, sinks=s, kernel=name, return_lse=True)
        except NotImplementedError:
            continue  # a kernel this CPU cannot run
        cos = np.sum(out * r) / np.linalg.norm(out) / np.linalg.norm(r)
        assert cos > 0.999, name
        assert np.abs(lse - rl).max() < 0.05, name


@pytest.mark.parametrize("kernel_name", list(fa_lab.BACKWARD_KERNELS))
@pytest.mark.parametrize("d_v", [3, 4])
def test_backward_with_sinks_and_dv_matches_finite_differences(kernel_name, d_v):
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal((2, 2, 7, 3))
    v = rng.standard_normal((2, 2, 7, d_v))
    s = rng.standard_normal(4)
    dout = rng.standard_normal((2, 4, 5, d_v))
    if not fa_lab.BACKWARD_KERNELS[kernel_name].dv and d_v != 3:
        out, lse = fa_lab.attention(q, k, v, sinks=s, return_lse=True)
        with pytest.raises(NotImplementedError, match="d_v"):
            fa_lab.attention_backward(q, k, v, out, lse, dout, sinks=s, kernel=kernel_name)
        return
    for causal in (False, True):
        out, lse = fa_lab.attention(q, k, v, sinks=s, causal=causal, return_lse=True)
        grads = fa_lab.attention_backward(q, k, v, out, lse, dout, sinks=s, causal=causal,
                                          kernel=kernel_name)
        num = numerical_grads(lambda q, k, v, sinks: np.sum(
            reference.attention(q, k, v, sinks=sinks, causal=causal)[0] * dout),
            {"q": q, "k": k, "v": v, "sinks": s})
        for g, name in zip(grads, ("q", "k", "v", "sinks")):
            np.testing.assert_allclose(g, num[name], atol=1e-7, rtol=1e-6, err_msg=name)


def test_attention_grad_returns_dsinks_shaped_like_sinks():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((3, 2, 4, 5)) for _ in range(3))
    for s in (rng.standard_normal(2), rng.standard_normal((3, 2))):
        out, backward = fa_lab.attention_grad(q, k, v, sinks=s)
        grads = backward(np.ones_like(out))
        assert len(grads) == 4 and grads[3].shape == s.shape


@pytest.mark.parametrize("sinks, error, match", [
    (np.zeros(3), ValueError, r"sinks must have shape \(4,\)"),
    (np.zeros((2, 4, 1)), ValueError, "sinks must have shape"),
    (np.array(["a"] * 4), TypeError, "sinks must be a real array"),
    (np.array([0, np.nan, 0, 0]), ValueError, "NaN or \\+inf"),
    (np.array([0, np.inf, 0, 0]), ValueError, "NaN or \\+inf"),
    (np.ma.masked_array(np.zeros(4)), TypeError, "masked"),
])
def test_bad_sinks_name_the_argument(sinks, error, match):
    q = np.zeros((2, 4, 3, 8), np.float32)
    with pytest.raises(error, match=match):
        fa_lab.attention(q, q, q, sinks=sinks)
    with pytest.raises(error, match=match):
        fa_lab.attention_with_kvcache(q, q.copy(), q.copy(), cache_seqlens=3, sinks=sinks)


def test_backward_refuses_an_output_without_d_v_columns():
    q, k = np.zeros((1, 2, 3, 8)), np.zeros((1, 2, 4, 8))
    v = np.zeros((1, 2, 4, 5))
    out, lse = fa_lab.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 3, 5\)"):
        fa_lab.attention_backward(q, k, v, out, lse, np.zeros((1, 2, 3, 8)))
