"""Sage's vector softmax (:mod:`fa_lab.kernels.lowprec.vsoftmax`) and the zmm operations it is
made of (:mod:`fa_lab.kernels.lowprec.zmm`): each against NumPy, on rows of awkward lengths (a
scalar tail after whole 32-score chunks), with ``-inf``, NaN and far-below-max scores."""

import re

import numpy as np
import pytest
from numba import njit

from fa_lab.settings import cpu_features
from fa_lab.kernels.lowprec import vsoftmax
from fa_lab.kernels.lowprec import zmm
from fa_lab.numerics.quant import from_bf16, to_bf16

HOST = cpu_features.detect()
needs_avx512 = pytest.mark.skipif(HOST.score_path is None, reason="CPU without AVX-512BW")
needs_bf16 = pytest.mark.skipif(not HOST.bf16, reason="CPU without AVX512-BF16")


@njit
def _ops(x, out):
    a, b = zmm.vload_f32(x, 0), zmm.vload_f32(x, 16)
    zmm.vstore(out, 0, zmm.vscalef(a, b))
    zmm.vstore(out, 16, zmm.vmax_nan(zmm.vsplat_f32(np.float32(-3.0)), a))
    zmm.vstore(out, 32, zmm.vfloor(a))
    zmm.vstore(out, 48, zmm.vsub(zmm.vadd(a, b), b))
    return zmm.hsum_f32(b), zmm.hmax_i32(zmm.vmax_i32(zmm.vorder_key(a), zmm.vorder_key(b)))


@njit
def _bf16(x, out):
    zmm.vstore(out, 0, zmm.vcvt2bf16(zmm.vload_f32(x, 0), zmm.vload_f32(x, 16)))


def _key(f):
    """The order-preserving int32 key of float32 ``f`` (NumPy)."""
    b = np.array([f], np.float32).view(np.int32)[0]
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@needs_avx512
def test_vector_operations_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(32) * 5).astype(np.float32)
    x[3], x[20], x[5], x[21] = np.nan, -np.inf, -200, -160
    out = np.zeros(64, np.float32)
    total, top = _ops(x, out)
    a, b = x[:16], x[16:]
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(out[:16], a * 2.0 ** np.floor(b))  # scalef, NaN and 0
        assert out[4] == 0 and out[5] == 0  # 2^-inf, and -200 * 2^-160 underflows to 0
        np.testing.assert_array_equal(out[16:32], np.where(np.isnan(a), a, np.maximum(a, -3)))
        np.testing.assert_array_equal(out[32:48], np.floor(a))
    assert total == pytest.approx(b.astype(np.float64).sum(), rel=1e-6)  # -inf: sum is -inf
    assert top == max(_key(f) for f in x)  # the NaN (sign clear) is the largest key
    assert np.isnan(np.array([top], np.int32).view(np.float32)[0])


@needs_bf16
def test_two_vectors_to_bf16_round_to_nearest_even_in_order():
    x = np.concatenate([np.linspace(-3, 3, 26),
                        [1 + 2 ** -8, 1 + 3 * 2 ** -8, np.nan, np.inf, -0.0, 65504]]
                       ).astype(np.float32)
    out = np.zeros(32, np.uint16)
    _bf16(x, out)
    np.testing.assert_array_equal(out[np.isfinite(x)], to_bf16(x)[np.isfinite(x)])
    assert np.isnan(from_bf16(out[28])) and from_bf16(out[29]) == np.inf


def _row(bc, seed, *, nan=False):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal(bc) * 4).astype(np.float32)
    s[rng.random(bc) < 0.2] = -np.inf
    if bc > 3:
        s[1] = s.max() - 120  # far below the max: p underflows to (almost) 0
    if nan:
        s[bc // 2] = np.nan
    return s


LENGTHS = [1, 31, 32, 70, 256, 97]


@needs_avx512
@pytest.mark.parametrize("bc", LENGTHS)
@pytest.mark.parametrize("pv", ["float32", "bfloat16"])
@pytest.mark.parametrize("m_old", [-np.inf, -1.0, 50.0])
def test_softmax_row_matches_numpy(bc, pv, m_old):
    if pv == "bfloat16" and not HOST.bf16:
        pytest.skip("CPU without AVX512-BF16")
    s = _row(bc, bc)
    P = np.full(bc, 7, np.uint16 if pv == "bfloat16" else np.float32)
    mx, alpha, total = vsoftmax.softmax_row(s, np.float32(m_old), P)
    m_new = max(np.float32(m_old), s.max())
    assert mx == m_new
    e = np.exp(s.astype(np.float64) - m_new)
    assert alpha == pytest.approx(np.exp(m_old - m_new), rel=1e-6)
    # the polynomial's error: degree 6 for fp32 P (a few ulps), degree 4 for bf16 (2.7e-6)
    poly = 2e-6 if pv == "float32" else 3e-6
    assert total == pytest.approx(e.sum(), rel=poly)
    got = from_bf16(P) if pv == "bfloat16" else P
    assert np.all(got[s == -np.inf] == 0)
    tol = poly if pv == "float32" else 2.0 ** -8 + poly  # plus one bf16 rounding (8 bits)
    with np.errstate(invalid="ignore"):  # and (s - m) log2 e rounded in fp32: |t| ulps
        tol = tol + np.nan_to_num(np.abs(s - m_new), posinf=0) * 2.0 ** -22
    assert np.all(np.abs(got - e) <= tol * e + 1e-37)


@needs_avx512
@pytest.mark.parametrize("bc", [32, 70])
def test_softmax_row_nan_and_fully_hidden_rows(bc):
    P = np.zeros(bc, np.float32)
    mx, alpha, total = vsoftmax.softmax_row(_row(bc, 1, nan=True), np.float32(0.5), P)
    assert np.isnan(mx) and np.isnan(total) and np.isnan(P).all()
    hidden = np.full(bc, -np.inf, np.float32)
    mx, alpha, total = vsoftmax.softmax_row(hidden, np.float32(-np.inf), P)
    assert mx == -np.inf and total == 0 and not P.any()
    assert alpha == 0  # exp(-inf - 0): the row's acc and l are still 0, so they stay 0


@needs_bf16
def test_softmax_compiles_to_scalef_and_the_bf16_conversion():
    fresh = njit(vsoftmax.softmax_row.py_func)
    fresh(np.zeros(64, np.float32), np.float32(0), np.zeros(64, np.uint16))
    asm = "\n".join(fresh.inspect_asm().values())
    found = set(re.findall(r"\b(v[a-z0-9]+)\b", asm))
    assert {"vscalefps", "vcvtne2ps2bf16", "vrndscaleps"} <= found
