"""Hypothesis over small shapes: invariances every correct kernel must have."""

import numpy as np
from hypothesis import given, settings, strategies as st

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import assert_close

TILED = [n for n, k in fa_lab.KERNELS.items() if k.tiled]
NUMBA = [n for n in fa_lab.KERNELS if n != "reference"]

shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.integers(1, 9))
causal = st.sampled_from([False, "top_left", "bottom_right"])


def _inputs(seed, H, Nq, Nk, d):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in
            [(H, Nq, d), (H, Nk, d), (H, Nk, d)]]


@settings(max_examples=40, deadline=None)
@given(shape=shapes, causal=causal, bq=st.integers(1, 48), bk=st.integers(1, 48),
       kernel=st.sampled_from(TILED), seed=st.integers(0, 2**16))
def test_block_size_invariance(shape, causal, bq, bk, kernel, seed):
    q, k, v = _inputs(seed, *shape)
    out = fa_lab.attention(q, k, v, causal=causal, kernel=kernel, block_q=bq, block_kv=bk)
    exp, _ = reference.attention(q, k, v, causal=causal)
    base, _ = reference.attention(q, k, v, causal=causal, dtype=np.float32)
    assert_close(out, exp, baseline=base, what=f"{kernel} Br={bq} Bc={bk}",
                 magnitude=np.abs(v).max())


@settings(max_examples=30, deadline=None)
@given(shape=shapes, kernel=st.sampled_from(NUMBA), seed=st.integers(0, 2**16))
def test_key_permutation_invariance(shape, kernel, seed):
    q, k, v = _inputs(seed, *shape)
    perm = np.random.default_rng(seed).permutation(k.shape[-2])
    a, la = fa_lab.attention(q, k, v, kernel=kernel, return_lse=True)
    b, lb = fa_lab.attention(q, k[:, perm], v[:, perm], kernel=kernel, return_lse=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=2e-6)
