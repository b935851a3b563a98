"""Gradients: every backward kernel against the float64 reference (flash-attn's 3x rule),
finite differences, torch autograd, fully masked rows, dropout, invariances, memory."""

import numpy as np
import pytest

import fa_lab
from conftest import check_grads, dout_like
from fa_lab.numerics import reference
from fa_lab.numerics.dropout import keep_mask
from fa_lab.numerics.testing import (AWKWARD_CASES, Case, ToleranceError, assert_close,
                                     assert_grads_match_finite_differences)

BACKWARD = list(fa_lab.BACKWARD_KERNELS)


@pytest.fixture(params=BACKWARD)
def bkernel(request):
    return request.param


def _blocks(kernel, bq=16, bk=24):
    return {"block_q": bq, "block_kv": bk} if fa_lab.BACKWARD_KERNELS[kernel].tiled else {}


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=lambda c: c.id)
def test_awkward_shapes(bkernel, dtype, case):
    q, k, v = case.inputs(dtype)
    check_grads(bkernel, q, k, v, _blocks(bkernel, case.block_q or 16, case.block_kv or 24),
                causal=case.causal)


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_masks_and_gqa(bkernel, causal):
    q, k, v = Case(B=2, H=4, H_kv=2, Nq=37, Nk=45, d=8).inputs(np.float32, seed=2)
    rng = np.random.default_rng(3)
    for mask in (rng.random((2, 1, 37, 45)) < 0.7,
                 (-0.1 * np.abs(np.arange(45)[None] - np.arange(37)[:, None])).astype(np.float32)):
        check_grads(bkernel, q, k, v, causal=causal, mask=mask)


def test_fully_masked_rows_have_zero_gradient(bkernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=9, Nk=7, d=4).inputs(dtype, seed=4)
    mask = np.ones((9, 7), bool)
    mask[[0, 6]] = False
    dq, dk, dv = check_grads(bkernel, q, k, v, mask=mask)
    assert np.all(dq[:, :, [0, 6]] == 0)
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))
    # bottom-right with Nq > Nk: the first rows see nothing
    q2, k2, v2 = Case(B=1, H=1, Nq=8, Nk=3, d=4).inputs(dtype, seed=5)
    dq2, *_ = check_grads(bkernel, q2, k2, v2, causal="bottom_right")
    assert np.all(dq2[0, 0, :5] == 0)


def test_long_sequence_accuracy(bkernel):
    q, k, v = Case(B=1, H=1, Nq=2048, d=64).inputs(np.float32, seed=6)
    check_grads(bkernel, q, k, v, causal=True)


@pytest.mark.parametrize("opts", [{}, {"causal": "bottom_right"},
                                  {"causal": True, "dropout_p": 0.25, "seed": 9}], ids=str)
def test_against_finite_differences(bkernel, opts):
    q, k, v = Case(B=1, H=2, H_kv=1, Nq=4, Nk=5, d=3).inputs(np.float64, seed=7)
    dout = dout_like(q)
    out, lse = fa_lab.attention(q, k, v, return_lse=True, kernel="reference", **opts)
    grads = fa_lab.attention_backward(q, k, v, out, lse, dout, kernel=bkernel, **opts)
    assert_grads_match_finite_differences(grads, q, k, v, dout, **opts)


def test_matches_torch_autograd(bkernel):
    torch = pytest.importorskip("torch", reason="optional comparison")
    q, k, v = Case(B=1, H=4, H_kv=2, Nq=30, Nk=30, d=16).inputs(np.float32, seed=8)
    dout = dout_like(q)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                         enable_gqa=True)
    o.backward(torch.from_numpy(dout))
    out, lse = fa_lab.attention(q, k, v, causal=True, return_lse=True)
    ours = fa_lab.attention_backward(q, k, v, out, lse, dout, causal=True, kernel=bkernel)
    for name, g, t in zip("qkv", ours, (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=2e-5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_fraction(p):
    kept = keep_mask(12345, 1, 2, 512, 512, p)
    assert abs((1 - kept.mean()) - p) < 0.01


def test_forward_and_backward_see_the_same_mask():
    q, k, v = Case(B=1, H=2, Nq=40, Nk=50, d=8).inputs(np.float32, seed=10)
    opts = {"dropout_p": 0.3, "causal": True}
    # forward (tiled_simd) and backward (tiled) regenerate the mask from the seed:
    got = check_grads("tiled", q, k, v, seed=21, **opts)
    # ...and a backward given the wrong seed is caught by the same check.
    out, lse = fa_lab.attention(q, k, v, return_lse=True, seed=21, **opts)
    wrong = fa_lab.attention_backward(q, k, v, out, lse, dout_like(q), seed=22, **opts)
    exp = reference.attention_backward(q, k, v, dout_like(q), seed=21, **opts)
    base = reference.attention_backward(q, k, v, dout_like(q), seed=21, dtype=np.float32, **opts)
    with pytest.raises(ToleranceError):
        assert_close(wrong[2], exp[2], baseline=base[2], rule="float32_grad")
    assert not np.allclose(got[2], wrong[2])


def test_dropout_invariant_to_blocks_and_threads():
    import numba

    q, k, v = Case(B=2, H=2, Nq=70, Nk=70, d=16).inputs(np.float32, seed=11)
    opts = {"dropout_p": 0.2, "seed": 5, "causal": True}
    dout = dout_like(q)
    base_out = fa_lab.attention(q, k, v, block_q=64, block_kv=64, **opts)
    out, lse = fa_lab.attention(q, k, v, return_lse=True, block_q=8, block_kv=24, **opts)
    np.testing.assert_allclose(out, base_out, atol=2e-6)
    ref = fa_lab.attention_backward(q, k, v, out, lse, dout, block_q=8, block_kv=8, **opts)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fa_lab.attention_backward(q, k, v, out, lse, dout, block_q=8, block_kv=8, **opts)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(ref, one):  # the two passes are race-free: bitwise identical
        assert np.array_equal(a, b)
    other = fa_lab.attention_backward(q, k, v, out, lse, dout, block_q=32, block_kv=16, **opts)
    for a, b in zip(ref, other):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-4)


def test_tiled_backward_memory_is_linear():
    from fa_lab.tools import memory

    def peak(N):
        q, k, v = Case(B=1, H=2, Nq=N, d=64).inputs(np.float32)
        out, lse = fa_lab.attention(q, k, v, return_lse=True)
        return memory.measure(fa_lab.attention_backward, q, k, v, out, lse, dout_like(q),
                              kernel="tiled").peak_bytes

    small, large = peak(512), peak(1024)
    assert large / small <= 2.2, (small, large)
    assert large < 1024 * 1024 * 4  # far below one N x N float32 matrix (4 MiB)


def test_attention_grad_helper():
    q, k, v = Case(B=1, H=2, Nq=10, Nk=12, d=4).inputs(np.float64, seed=12)
    out, backward = fa_lab.attention_grad(q, k, v, causal="bottom_right")
    dq, dk, dv = backward(np.ones_like(out))
    exp = reference.attention_backward(q, k, v, np.ones_like(out), causal="bottom_right")
    for g, e in zip((dq, dk, dv), exp):
        np.testing.assert_allclose(g, e, atol=1e-12)


def test_errors():
    q, k, v = Case(B=1, H=2, Nq=6, Nk=5, d=4).inputs(np.float32)
    out, lse = fa_lab.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 6, 4\)"):
        fa_lab.attention_backward(q, k, v, out, lse, out[..., :3])
    with pytest.raises(ValueError, match="lse must have shape"):
        fa_lab.attention_backward(q, k, v, out, lse[..., :2], out)
    with pytest.raises(TypeError, match="dout must have q's dtype"):
        fa_lab.attention_backward(q, k, v, out, lse, out.astype(np.float64))
    with pytest.raises(ValueError, match="seed is required"):
        fa_lab.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        fa_lab.attention(q, k, v, dropout_p=1.0, seed=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        fa_lab.attention(q, k, v, dropout_p=0.1, seed=1.5)
    with pytest.raises(NotImplementedError, match="kernel 'naive' does not support dropout"):
        fa_lab.attention(q, k, v, dropout_p=0.1, seed=1, kernel="naive")
    with pytest.raises(ValueError, match="kernel must be 'auto' or one of"):
        fa_lab.attention_backward(q, k, v, out, lse, out, kernel="tiled_simd")
    dq, dk, dv = fa_lab.attention_backward(q[:, :, :0], k, v, out[:, :, :0], lse[:, :, :0],
                                           out[:, :, :0])
    assert dq.shape == (1, 2, 0, 4) and np.all(dk == 0) and dk.shape == k.shape
