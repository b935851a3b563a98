"""Gradients with flash-attn's score modifiers (window, softcap incl. its ``1 - tanh^2``,
ALiBi): backward kernels against the float64 reference backward, the reference backward
against finite differences of the reference forward and against torch autograd."""

import numpy as np
import pytest

import fa_lab
from conftest import check_grads, dout_like
from fa_lab.numerics import reference
from fa_lab.numerics.testing import AWKWARD_CASES, Case, assert_grads_match_finite_differences

MOD_BACKWARD = [n for n, k in fa_lab.BACKWARD_KERNELS.items()
                if k.window and k.softcap and k.alibi]
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
MODS = {"window": dict(window=(5, 2)), "softcap": dict(softcap=1.5),
        "alibi": dict(alibi_slopes=SLOPES),
        "all": dict(window=(7, 0), softcap=2.0, alibi_slopes=SLOPES)}


@pytest.fixture(params=MOD_BACKWARD)
def bkernel(request):
    return request.param


def test_the_tiled_backward_supports_them():
    assert "tiled" in MOD_BACKWARD


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_modifiers_every_alignment(bkernel, dtype, causal, mods):
    q, k, v = Case(B=2, H=4, H_kv=2, Nq=23, Nk=31, d=7).inputs(dtype, seed=2)
    check_grads(bkernel, q, k, v, {"block_q": 4, "block_kv": 6}, causal=causal, **MODS[mods])


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=lambda c: c.id)
def test_modifiers_awkward_shapes(bkernel, dtype, case):
    q, k, v = case.inputs(dtype, seed=3)
    blocks = {"block_q": case.block_q or 16, "block_kv": case.block_kv or 24}
    check_grads(bkernel, q, k, v, blocks, causal=case.causal, window=(9, 2), softcap=3.0,
                alibi_slopes=SLOPES[:case.H] if case.H <= 4 else None)


def test_rows_outside_every_window_have_zero_gradient(bkernel, dtype):
    q, k, v = Case(B=1, H=2, Nq=7, Nk=4, d=3).inputs(dtype, seed=4)
    dq, dk, dv = check_grads(bkernel, q, k, v, {"block_q": 2, "block_kv": 3}, window=(2, 0),
                             softcap=1.0)
    assert np.all(dq[..., :3, :] == 0)
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))


def test_long_sequence_sliding_window(bkernel):
    q, k, v = Case(B=1, H=1, Nq=1500, d=64).inputs(np.float32, seed=5)
    check_grads(bkernel, q, k, v, {"block_q": 64, "block_kv": 64}, causal=True,
                window=(200, 0), softcap=5.0)


@pytest.mark.parametrize("opts", [dict(window=(2, 1)), dict(softcap=0.7),
                                  dict(alibi_slopes=SLOPES[:2], causal="bottom_right"),
                                  dict(causal=True, window=(1, 0), softcap=1.3,
                                       alibi_slopes=SLOPES[:2])], ids=str)
def test_reference_backward_against_finite_differences(opts):
    q, k, v = Case(B=1, H=2, H_kv=1, Nq=4, Nk=5, d=3).inputs(np.float64, seed=6,
                                                             magnitude=2.0)
    dout = dout_like(q)
    grads = reference.attention_backward(q, k, v, dout, **opts)
    assert_grads_match_finite_differences(grads, q, k, v, dout, **opts)


def test_against_torch_autograd(bkernel):
    torch = pytest.importorskip("torch", reason="optional comparison")
    q, k, v = Case(B=1, H=4, H_kv=2, Nq=30, Nk=34, d=16).inputs(np.float64, seed=7)
    dout = dout_like(q)
    opts = dict(causal="bottom_right", window=(6, 0), softcap=1.5, alibi_slopes=SLOPES)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (tk, tv))
    x = tq @ kr.transpose(-1, -2) / np.sqrt(16)
    s = 1.5 * torch.tanh(x / 1.5)
    i = torch.arange(30)[:, None] + 4
    j = torch.arange(34)[None, :]
    s = s - torch.tensor(SLOPES)[:, None, None] * (i - j).abs()
    s = s.masked_fill(~((j <= i) & (j >= i - 6)), float("-inf"))
    (torch.softmax(s, -1) @ vr).backward(torch.from_numpy(dout))
    out, lse = fa_lab.attention(q, k, v, return_lse=True, **opts)
    ours = fa_lab.attention_backward(q, k, v, out, lse, dout, kernel=bkernel, **opts)
    for name, g, t in zip("qkv", ours, (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=1e-12, rtol=1e-10, err_msg=name)


def test_naive_backward_refuses_by_name():
    q, k, v = Case(B=1, H=2, Nq=4, d=2).inputs()
    out, lse = fa_lab.attention(q, k, v, return_lse=True, softcap=1.0)
    with pytest.raises(NotImplementedError, match="naive.*softcap"):
        fa_lab.attention_backward(q, k, v, out, lse, out, kernel="naive", softcap=1.0)


def test_attention_grad_passes_the_modifiers():
    q, k, v = Case(B=1, H=2, Nq=9, d=4).inputs(np.float64, seed=8)
    opts = dict(window=(3, 0), softcap=2.0, alibi_slopes=SLOPES[:2])
    out, backward = fa_lab.attention_grad(q, k, v, **opts)
    got = backward(np.ones_like(out))
    exp = reference.attention_backward(q, k, v, np.ones_like(out), **opts)
    for g, e in zip(got, exp):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
