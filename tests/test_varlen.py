"""attention_varlen: a packed batch equals one attention call per sequence; cu_seqlens
checks; zero-length sequences; no task is spent on padding."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fa_lab
from fa_lab.numerics import reference
from fa_lab.kernels.layouts.varlen import varlen_tasks
from fa_lab.registry import VARLEN_KERNELS
from fa_lab.numerics.testing import assert_close, lse_magnitude
from fa_lab.features.varlen import pack, unpack

SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])


@pytest.fixture(params=list(VARLEN_KERNELS))
def vkernel(request):
    return request.param


def _batch(lq, lk, H=4, H_kv=2, d=7, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    qs = [rng.standard_normal((n, H, d)).astype(dtype) for n in lq]
    ks = [rng.standard_normal((n, H_kv, d)).astype(dtype) for n in lk]
    vs = [rng.standard_normal((n, H_kv, d)).astype(dtype) for n in lk]
    return qs, ks, vs


def check_varlen(kernel, qs, ks, vs, **opts):
    """The packed call against the float64 reference of each sequence (the 2x rule)."""
    (q, cu_q), (k, cu_k), (v, _) = pack(qs), pack(ks), pack(vs)
    blocks = {n: opts.pop(n) for n in ("block_q", "block_kv") if n in opts}
    if kernel in VARLEN_KERNELS and not VARLEN_KERNELS[kernel].tiled:
        blocks = {}
    out, lse = fa_lab.attention_varlen(q, k, v, cu_q, cu_k, kernel=kernel, return_lse=True,
                                       **opts, **blocks)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    for b, (o, qb, kb, vb) in enumerate(zip(unpack(out, cu_q), qs, ks, vs)):
        per = dict(opts)
        if np.ndim(opts.get("alibi_slopes")) == 2:
            per["alibi_slopes"] = opts["alibi_slopes"][b]
        args = [x.transpose(1, 0, 2) for x in (qb, kb, vb)]  # (H, N, d)
        exp, exp_lse = reference.attention(*args, **per)
        base, base_lse = reference.attention(*args, dtype=q.dtype.type, **per)
        got_lse = lse[:, cu_q[b]:cu_q[b + 1]]
        assert_close(o.transpose(1, 0, 2), exp, baseline=base, what=f"sequence {b} out",
                     magnitude=np.abs(vb).max(initial=0.0))
        assert_close(got_lse, exp_lse, baseline=base_lse, what=f"sequence {b} lse",
                     magnitude=lse_magnitude(exp_lse, args[0], args[1], opts.get("scale")))
    return out, lse


LENGTHS = [([5, 0, 37, 130, 1, 64], [7, 3, 37, 129, 0, 64]),  # zero-length q and k
           ([1], [300]),  # one decode-like sequence
           ([17, 17, 17], [17, 17, 17]),
           ([0, 0], [0, 4])]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_equals_per_sequence_calls(vkernel, dtype, lengths, causal):
    qs, ks, vs = _batch(*lengths, dtype=dtype)
    check_varlen(vkernel, qs, ks, vs, causal=causal, block_q=16, block_kv=24)


@pytest.mark.parametrize("opts", [dict(window=(6, 0)), dict(window=(-1, 3), softcap=1.5),
                                  dict(alibi_slopes=SLOPES, causal=True),
                                  dict(window=(9, 2), softcap=3.0, causal="bottom_right",
                                       alibi_slopes=np.outer([1, 2, 3, 4, 5, 6], SLOPES))],
                         ids=str)
def test_modifiers_per_sequence(vkernel, dtype, opts):
    qs, ks, vs = _batch(*LENGTHS[0], dtype=dtype, seed=1)
    check_varlen(vkernel, qs, ks, vs, block_q=8, block_kv=8, **opts)


def test_default_blocks_and_auto():
    qs, ks, vs = _batch([300, 3, 520], [310, 600, 520], H=2, H_kv=1, d=64, seed=2)
    check_varlen("auto", qs, ks, vs, causal="bottom_right")


def test_packed_equals_padded_batch_rows():
    # the same batch padded to the longest sequence with a key-padding mask gives the
    # same rows (the padded computation is what varlen avoids)
    lens = [3, 11, 6]
    qs, ks, vs = _batch(lens, lens, H=2, H_kv=2, d=8, dtype=np.float64, seed=3)
    (q, cu), (k, _), (v, _) = pack(qs), pack(ks), pack(vs)
    out = fa_lab.attention_varlen(q, k, v, cu, cu, causal=True)
    N = max(lens)
    pad = lambda xs: np.stack([np.pad(x, ((0, N - len(x)), (0, 0), (0, 0)))  # noqa: E731
                               for x in xs]).transpose(0, 2, 1, 3)
    mask = (np.arange(N)[None, :] < np.array(lens)[:, None])[:, None, None, :]
    padded = fa_lab.attention(pad(qs), pad(ks), pad(vs), causal=True, mask=mask)
    for b, o in enumerate(unpack(out, cu)):
        np.testing.assert_allclose(o, padded[b, :, :lens[b]].transpose(1, 0, 2), rtol=1e-12,
                                   atol=1e-12)


def test_no_task_is_spent_on_padding():
    cu = np.array([0, 5, 5, 300, 301])
    tasks = varlen_tasks(cu, 3, 64)
    assert len(tasks) == 3 * (1 + 0 + 5 + 1)  # ceil(len / 64) per sequence and head
    assert tasks[0, 0] == 2  # the longest sequence first
    assert set(map(tuple, tasks[:, [0, 2]])) == {(0, 0), (3, 0)} | {(2, i) for i in
                                                                    range(0, 295, 64)}


def test_empty_batch():
    q = np.zeros((0, 2, 4), np.float32)
    out, lse = fa_lab.attention_varlen(q, q[:, :1], q[:, :1], [0], [0], return_lse=True)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)


@settings(max_examples=25, deadline=None)
@given(lq=st.lists(st.integers(0, 20), min_size=1, max_size=5), data=st.data(),
       causal=st.sampled_from([False, True, "bottom_right"]), seed=st.integers(0, 2**16))
def test_random_batches(lq, data, causal, seed):
    lk = data.draw(st.lists(st.integers(0, 20), min_size=len(lq), max_size=len(lq)))
    qs, ks, vs = _batch(lq, lk, H=2, H_kv=1, d=3, seed=seed)
    check_varlen("flash", qs, ks, vs, causal=causal, block_q=4, block_kv=5, window=(3, 1))


# --- errors -----------------------------------------------------------------------------


def _packed():
    qs, ks, vs = _batch([3, 4], [3, 4], H=2, H_kv=1, d=4)
    return pack(qs)[0], pack(ks)[0], pack(vs)[0]


@pytest.mark.parametrize("cu_q, cu_k, exc, match", [
    ([1, 3, 7], [0, 3, 7], ValueError, "cu_seqlens_q must start at 0"),
    ([0, 5, 3, 7], [0, 3, 3, 7], ValueError, "cu_seqlens_q must be non-decreasing"),
    ([0, 3, 6], [0, 3, 7], ValueError, "cu_seqlens_q must end at the number of tokens 7"),
    ([0, 3, 7], [0, 3, 8], ValueError, "cu_seqlens_k must end"),
    ([0, 3, 7], [0, 7], ValueError, "same number of sequences"),
    ([0.0, 3.0, 7.0], [0, 3, 7], TypeError, "cu_seqlens_q must be an integer array"),
    ([[0, 3, 7]], [0, 3, 7], ValueError, "cu_seqlens_q must be 1-D"),
])
def test_bad_cu_seqlens(cu_q, cu_k, exc, match):
    q, k, v = _packed()
    with pytest.raises(exc, match=match):
        fa_lab.attention_varlen(q, k, v, np.array(cu_q), np.array(cu_k))


def test_other_errors():
    q, k, v = _packed()
    cu = np.array([0, 3, 7], np.int32)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is smaller"):
        fa_lab.attention_varlen(q, k, v, cu, cu, max_seqlen_q=3)
    with pytest.raises(ValueError, match="q must have the packed shape"):
        fa_lab.attention_varlen(q[None], k, v, cu, cu)
    with pytest.raises(ValueError, match="heads of q"):
        fa_lab.attention_varlen(q.repeat(3, 1)[:, :3], k.repeat(2, 1), v.repeat(2, 1), cu, cu)
    with pytest.raises(TypeError, match="share one dtype"):
        fa_lab.attention_varlen(q, k.astype(np.float64), v, cu, cu)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fa_lab.attention_varlen(q, k, v, cu, cu, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="window left"):
        fa_lab.attention_varlen(q, k, v, cu, cu, window=(-3, 0))
    with pytest.raises(ValueError, match="kernel must be 'auto' or one of"):
        fa_lab.attention_varlen(q, k, v, cu, cu, kernel="naive")
    with pytest.raises(NotImplementedError, match="reference.*not tiled"):
        fa_lab.attention_varlen(q, k, v, cu, cu, kernel="reference", block_q=4)
