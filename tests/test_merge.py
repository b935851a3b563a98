"""merge_states (the exact LSE merge) and cascade_attention (a shared prefix read once)."""

from __future__ import annotations

import numpy as np
import pytest

import fa_lab
from fa_lab.numerics import reference
from fa_lab.numerics.testing import AWKWARD_CASES, assert_close, lse_magnitude

CASES = [c for c in AWKWARD_CASES if (c.Nk or c.Nq) >= 2]


def _split_and_merge(q, k, v, cut, causal=False):
    """attention over keys [:cut] and [cut:], merged (bottom-right causal alignment
    is kept by masking with explicit positions)."""
    Nq, Nk = q.shape[2], k.shape[2]
    allowed = np.ones((Nq, Nk), bool)
    if causal:
        allowed = np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + (Nk - Nq)
    a = fa_lab.attention(q, k[:, :, :cut], v[:, :, :cut], mask=allowed[:, :cut],
                         return_lse=True)
    b = fa_lab.attention(q, k[:, :, cut:], v[:, :, cut:], mask=allowed[:, cut:],
                         return_lse=True)
    return fa_lab.merge_states(*a, *b)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merge_of_two_key_halves_is_the_whole_attention(case):
    q, k, v = case.inputs(np.float64, seed=3)
    nk = k.shape[2]
    causal = case.causal == "bottom_right"
    for cut in (1, nk // 2, nk - 1):
        out, lse = _split_and_merge(q, k, v, cut, causal)
        exp, exp_lse = reference.attention(q, k, v, causal="bottom_right" if causal else False)
        assert_close(out, exp, rule="float64", what=f"out (cut {cut})")
        assert_close(lse, exp_lse, rule="float64", what=f"lse (cut {cut})")


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: c.id)
def test_merge_in_float32_is_within_the_tolerance_table(case):
    q, k, v = case.inputs(np.float32, seed=4)
    out, lse = _split_and_merge(q, k, v, k.shape[2] // 2)
    exp, exp_lse = reference.attention(q, k, v)
    base, base_lse = reference.attention(q, k, v, dtype=np.float32)
    assert_close(out, exp, baseline=base, magnitude=np.abs(v).max())
    assert_close(lse, exp_lse, baseline=base_lse, what="lse", magnitude=lse_magnitude(exp_lse, q, k))


def test_merge_is_commutative_and_associative():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 8))
    k, v = rng.standard_normal((2, 3, 30, 8)), rng.standard_normal((2, 3, 30, 8))
    parts = [fa_lab.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True)
             for a, b in ((0, 7), (7, 19), (19, 30))]
    left = fa_lab.merge_states(*fa_lab.merge_states(*parts[0], *parts[1]), *parts[2])
    right = fa_lab.merge_states(*parts[2], *fa_lab.merge_states(*parts[1], *parts[0]))
    exp, exp_lse = reference.attention(q, k, v)
    for got in (left, right):
        assert_close(got[0], exp, rule="float64")
        assert_close(got[1], exp_lse, rule="float64", what="lse")


def test_an_empty_part_is_ignored_even_when_its_output_is_nan():
    rng = np.random.default_rng(1)
    o = rng.standard_normal((1, 2, 4, 3)).astype(np.float32)
    lse = rng.standard_normal((1, 2, 4)).astype(np.float32)
    empty_o = np.full_like(o, np.nan)  # what torch writes for fully masked rows
    empty_lse = np.full_like(lse, -np.inf)
    for out, l in (fa_lab.merge_states(o, lse, empty_o, empty_lse),
                   fa_lab.merge_states(empty_o, empty_lse, o, lse)):
        np.testing.assert_array_equal(out, o)
        np.testing.assert_array_equal(l, lse)
    out, l = fa_lab.merge_states(empty_o, empty_lse, empty_o, empty_lse)
    assert np.all(out == 0) and np.all(l == -np.inf)  # no part saw a key


def test_a_nan_lse_makes_the_row_nan_and_only_that_row():
    o = np.ones((1, 1, 3, 2))
    lse = np.zeros((1, 1, 3))
    bad = lse.copy()
    bad[0, 0, 1] = np.nan
    out, l = fa_lab.merge_states(o, lse, o, bad)
    assert np.isnan(out[0, 0, 1]).all() and np.isnan(l[0, 0, 1])
    np.testing.assert_allclose(out[0, 0, [0, 2]], 1.0)
    np.testing.assert_allclose(l[0, 0, [0, 2]], np.log(2.0))


def test_extreme_lses_do_not_overflow():
    o_a, o_b = np.full((1, 1, 1, 2), 1.0), np.full((1, 1, 1, 2), 3.0)
    out, lse = fa_lab.merge_states(o_a, np.array([[[1e4]]]), o_b, np.array([[[1e4]]]))
    np.testing.assert_allclose(out, 2.0)
    np.testing.assert_allclose(lse, 1e4 + np.log(2.0))


def test_merge_states_accepts_any_leading_dims():
    o = np.ones((5, 2))  # (N, d)
    out, lse = fa_lab.merge_states(o, np.zeros(5), 3 * o, np.zeros(5))
    np.testing.assert_allclose(out, 2.0)
    assert lse.shape == (5,)


@pytest.mark.parametrize("bad, match", [
    (dict(out_b=np.ones((1, 2, 4, 4), np.float32)), "out_b must have out_a's shape"),
    (dict(lse_a=np.ones((1, 2, 3), np.float32)), "lse_a must have shape"),
    (dict(lse_b=np.ones((1, 2, 4), np.float64)), "lse_b must have out_a's dtype"),
    (dict(out_a=np.ones((1, 2, 4, 3), np.int32)), "out_a must be a float32 or float64"),
    (dict(out_a=np.ones(3, np.float32)), "out_a must have at least 2 dims"),
])
def test_merge_states_bad_input_names_the_argument(bad, match):
    args = dict(out_a=np.ones((1, 2, 4, 3), np.float32), lse_a=np.ones((1, 2, 4), np.float32),
                out_b=np.ones((1, 2, 4, 3), np.float32), lse_b=np.ones((1, 2, 4), np.float32))
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=match):
        fa_lab.merge_states(**args)


# --- cascade attention: one shared prefix ----------------------------------------------

def _cascade_inputs(B=3, H=4, H_kv=2, Nq=5, P=37, S=11, d=7, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, d)).astype(dtype)
    kp, vp = (rng.standard_normal((H_kv, P, d)).astype(dtype) for _ in range(2))
    ks, vs = (rng.standard_normal((B, H_kv, S, d)).astype(dtype) for _ in range(2))
    return q, kp, vp, ks, vs


def _concat(kp, ks):
    return np.concatenate([np.broadcast_to(kp, (ks.shape[0],) + kp.shape), ks], axis=2)


@pytest.mark.parametrize("shape", [dict(), dict(Nq=1), dict(H_kv=1, P=1, S=1, Nq=1),
                                   dict(B=1, H=2, H_kv=2, Nq=11, S=11, P=64, d=16),
                                   dict(S=0, Nq=3)])
@pytest.mark.parametrize("causal", [False, True])
def test_cascade_equals_attention_over_prefix_and_suffix(shape, causal):
    q, kp, vp, ks, vs = _cascade_inputs(**shape)
    if causal and q.shape[2] > ks.shape[2]:
        with pytest.raises(ValueError, match="Nq=.* must be <= the suffix length"):
            fa_lab.cascade_attention(q, kp, vp, ks, vs, causal=True)
        return
    out, lse = fa_lab.cascade_attention(q, kp, vp, ks, vs, causal=causal, return_lse=True)
    exp, exp_lse = reference.attention(q, _concat(kp, ks), _concat(vp, vs),
                                       causal="bottom_right" if causal else False)
    assert_close(out, exp, rule="float64")
    assert_close(lse, exp_lse, rule="float64", what="lse")


def test_cascade_in_float32_is_within_the_tolerance_table():
    q, kp, vp, ks, vs = _cascade_inputs(dtype=np.float32, Nq=1, P=300, S=20)
    out = fa_lab.cascade_attention(q, kp, vp, ks, vs, causal=True)
    K, V = _concat(kp, ks), _concat(vp, vs)
    exp, _ = reference.attention(q, K, V, causal="bottom_right")
    base, _ = reference.attention(q, K, V, causal="bottom_right", dtype=np.float32)
    assert_close(out, exp, baseline=base, magnitude=np.abs(V).max())


@pytest.mark.parametrize("index, bad, match", [
    (1, np.ones((2, 37, 8)), "k_prefix must be"),
    (2, np.ones((2, 36, 7)), "v_prefix must have k_prefix's shape"),
    (3, np.ones((2, 2, 11, 7)), "k_suffix must be"),
    (4, np.ones((3, 2, 10, 7)), "v_suffix must have k_suffix's shape"),
    (1, np.ones((3, 37, 7)), "multiple of the prefix's kv heads"),
    (0, np.ones((3, 4, 5)), "q must be"),
    (3, np.ones((3, 2, 11, 7), np.float32), "k_suffix must have q's dtype"),
])
def test_cascade_bad_input_names_the_argument(index, bad, match):
    args = list(_cascade_inputs())
    args[index] = bad
    with pytest.raises((TypeError, ValueError), match=match):
        fa_lab.cascade_attention(*args)


def test_cascade_refuses_unknown_keywords():
    with pytest.raises(TypeError):
        fa_lab.cascade_attention(*_cascade_inputs(), window=(4, 0))
