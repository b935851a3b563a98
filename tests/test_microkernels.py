"""The low-precision micro-kernels: exact integer dot products, bf16 against a NumPy
bf16-rounded reference, the instruction each path must compile to (read from the
assembly), the peak loops' checksums, and the CPU-feature detection and overrides."""

import re

import numpy as np
import pytest
from numba import njit

from fa_lab.settings import cpu_features
from fa_lab.kernels.lowprec import microkernels as mk
from fa_lab.numerics.quant import from_bf16, to_bf16
from fa_lab.kernels.probes import peaks, tiles

HOST = cpu_features.detect()
needs_vnni = pytest.mark.skipif(not HOST.vnni, reason="CPU without AVX512-VNNI")
needs_bf16 = pytest.mark.skipif(not HOST.bf16, reason="CPU without AVX512-BF16")
needs_avx512 = pytest.mark.skipif(HOST.score_path is None, reason="CPU without AVX-512BW")


@njit
def _score_tile(Qx, ldq, Kp, steps, corr, sk, rs, S):
    mk.s_tile(Qx, 0, ldq, Kp, 0, steps, corr, sk, 0, rs, 0, S, 0, 32)


@njit
def _pv_tile(Px, ldp, n, Vx, ldv, alpha, acc):
    mk.pv_tile(Px, 0, ldp, n, Vx, 0, ldv, alpha, 0, acc, 0, 32)


def _pack_k(k, width):
    """K (32, d) -> 2 groups of 16 keys, [d/width][16 keys][width] each (as pack_kv)."""
    d = k.shape[1]
    return np.ascontiguousarray(k.reshape(2, 16, d // width, width).transpose(0, 2, 1, 3)).ravel()


def _int_operands(seed, d):
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (mk.MR_S, d)).astype(np.int8)
    k = rng.integers(-127, 128, (32, d)).astype(np.int8)
    q[0], k[0] = 127, -127  # the extremes: |sum| = 127^2 d
    return q, k, q.astype(np.int64) @ k.astype(np.int64).T


ONES = np.ones(32, np.float32), np.ones(mk.MR_S, np.float32)


@needs_vnni
@pytest.mark.parametrize("d", [4, 64, 132])
def test_vnni_score_tile_is_the_exact_integer_product(d):
    q, k, exact = _int_operands(d, d)
    qu = (q.astype(np.int16) + 128).astype(np.uint8).ravel()  # unsigned: shifted by 128
    corr = (-128 * k.astype(np.int32).sum(axis=1)).astype(np.int32)
    S = np.zeros(mk.MR_S * 32, np.float32)
    _score_tile(qu, d, _pack_k(k, 4), d // 4, corr, *ONES, S)
    np.testing.assert_array_equal(S.reshape(mk.MR_S, 32), exact)  # |S| < 2^24: exact in fp32


@needs_avx512
@pytest.mark.parametrize("d", [2, 64, 34])
def test_vpmaddwd_score_tile_is_the_exact_integer_product(d):
    q, k, exact = _int_operands(d + 1, d)
    S = np.zeros(mk.MR_S * 32, np.float32)
    _score_tile(q.astype(np.int16).ravel(), d, _pack_k(k.astype(np.int16), 2), d // 2,
                np.zeros(32, np.int32), *ONES, S)
    np.testing.assert_array_equal(S.reshape(mk.MR_S, 32), exact)


@needs_vnni
def test_score_tile_applies_row_and_key_scales():
    q, k, exact = _int_operands(7, 16)
    sk = np.linspace(0.5, 2, 32).astype(np.float32)
    rs = np.array([1, 0.25, -3, 0, 2, 1, 1, 0.5], np.float32)
    S = np.zeros(mk.MR_S * 32, np.float32)
    corr = (-128 * k.astype(np.int32).sum(axis=1)).astype(np.int32)
    _score_tile((q.astype(np.int16) + 128).astype(np.uint8).ravel(), 16, _pack_k(k, 4), 4,
                corr, sk, rs, S)
    np.testing.assert_allclose(S.reshape(mk.MR_S, 32), exact * rs[:, None] * sk[None, :], rtol=1e-6)


def test_round_bf16_matches_numpy_nearest_even():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 100,
                        np.array([0, -0.0, np.inf, -np.inf, 1e-40, 3.4e38], np.float32),
                        # exact ties: 1 + 2^-8 rounds down to even, 1 + 3 * 2^-8 up
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)])
    out = np.empty(x.size, np.uint16)
    mk.round_bf16(x, out)
    np.testing.assert_array_equal(out, to_bf16(x))
    assert from_bf16(out[-2]) == 1.0 and from_bf16(out[-1]) == 1 + 2 ** -6
    nan = np.empty(1, np.uint16)
    mk.round_bf16(np.array([np.nan], np.float32), nan)
    assert np.isnan(from_bf16(nan))


def _pv_operands(seed, n):
    rng = np.random.default_rng(seed)
    P = rng.random((mk.MR, n)).astype(np.float32)
    V = (rng.standard_normal((n, 32)) * 3).astype(np.float32)
    acc = rng.standard_normal(mk.MR * 32).astype(np.float32)
    alpha = np.array([1, 0.5, 0, 2, 1, 3, 0.25, 1], np.float32)[:mk.MR]
    return P, V, acc, alpha


@needs_bf16
@pytest.mark.parametrize("pairs", [1, 7, 64])
def test_bf16_pv_tile_matches_a_bf16_rounded_reference(pairs):
    P, V, acc, alpha = _pv_operands(pairs, 2 * pairs)
    pb, vb = to_bf16(P), to_bf16(V)
    packed = np.ascontiguousarray(vb.reshape(pairs, 2, 32).transpose(0, 2, 1)).ravel()
    expected = (alpha[:, None] * acc.reshape(mk.MR, 32).astype(np.float64)
                + from_bf16(pb).astype(np.float64) @ from_bf16(vb))
    got = acc.copy()
    _pv_tile(pb.ravel(), 2 * pairs, pairs, packed, 64, alpha, got)
    # exact bf16 products, fp32 sums: a few fp32 ulps of sum |p v| (plus the acc term)
    bound = (np.abs(from_bf16(pb)).astype(np.float64) @ np.abs(from_bf16(vb))
             + np.abs(alpha[:, None] * acc.reshape(mk.MR, 32)))
    assert np.all(np.abs(got.reshape(mk.MR, 32) - expected) <= 2 * pairs * 2.0 ** -23 * bound + 1e-30)
    # and the rounding is really bf16 (not fp32): fp32 P V differs by far more
    assert np.abs(got.reshape(mk.MR, 32) - (alpha[:, None] * acc.reshape(mk.MR, 32) + P @ V)).max() > 1e-4


@needs_avx512
@pytest.mark.parametrize("n", [1, 13, 128])
def test_fp32_pv_tile_matches_float64(n):
    P, V, acc, alpha = _pv_operands(n, n)
    got = acc.copy()
    _pv_tile(P.ravel(), n, n, V.ravel(), 32, alpha, got)
    expected = alpha[:, None] * acc.reshape(mk.MR, 32).astype(np.float64) + P.astype(np.float64) @ V
    np.testing.assert_allclose(got.reshape(mk.MR, 32), expected, rtol=1e-5, atol=1e-5)


def _asm(fn, *args):
    fn(*args)
    return "\n".join(fn.inspect_asm().values())


INSTRUCTIONS = [
    ("vnni", "vpdpbusd", needs_vnni),
    ("i16", "vpmaddwd|vpdpwssd", needs_avx512),  # LLVM fuses + vpaddd into VNNI's vpdpwssd
    ("bf16", "vdpbf16ps", needs_bf16),
    ("fp32", "vfmadd231ps", needs_avx512),
]


@pytest.mark.parametrize("path,instruction", [pytest.param(p, i, marks=m)
                                              for p, i, m in INSTRUCTIONS])
def test_each_path_compiles_to_its_instruction(path, instruction):
    d = 64
    if path in ("vnni", "i16"):
        w = 4 if path == "vnni" else 2
        qt, kt = (np.uint8, np.int8) if path == "vnni" else (np.int16, np.int16)
        fresh = njit(_score_tile.py_func)  # a fresh copy: inspect_asm of a cached one is empty
        asm = _asm(fresh, np.zeros(mk.MR_S * d, qt), d, np.zeros(32 * d, kt), d // w,
                   np.zeros(32, np.int32), *ONES, np.zeros(mk.MR_S * 32, np.float32))
    else:
        pt = np.uint16 if path == "bf16" else np.float32
        fresh = njit(_pv_tile.py_func)
        asm = _asm(fresh, np.zeros(mk.MR * 8, pt), 8, 4, np.zeros(8 * 64, pt), 64,
                   np.ones(mk.MR, np.float32), np.zeros(mk.MR * 32, np.float32))
    found = set(re.findall(r"\b(v[a-z0-9]+)\b", asm))
    assert found & set(instruction.split("|")), f"{instruction} not in the {path} path's assembly"
    assert "zmm" in asm  # 512-bit registers


# vpmaddwd + vpaddd: LLVM fuses the pair into VNNI's vpdpwssd where the CPU has it
@pytest.mark.parametrize("name,instruction", [("vnni", "vpdpbusd"), ("i16", "vpmaddwd|vpdpwssd"),
                                              ("bf16", "vdpbf16ps"), ("fp32", "vfmadd")])
def test_peak_loops_compute_what_they_count(name, instruction):
    if name == "vnni" and not HOST.vnni or name == "bf16" and not HOST.bf16:
        pytest.skip("instruction not on this CPU")
    if HOST.score_path is None:
        pytest.skip("no AVX-512")
    loop = {"vnni": peaks.peak_vnni, "i16": peaks.peak_i16, "bf16": peaks.peak_bf16,
            "fp32": peaks.peak_fp32}[name]
    if name == "vnni":
        x = np.full(64, 2, np.int8)  # u8 2 x s8 2, 4 per lane: +16 per lane per round
        assert loop(x, x, 10) == 12 * 16 * 16 * 10
    elif name == "bf16":
        x = to_bf16(np.full(32, 0.5, np.float32))  # 0.5 * 0.5 * 2 per lane per round
        assert loop(x, x, 8) == pytest.approx(12 * 16 * 0.5 * 8)
    elif name == "fp32":
        x = np.full(16, 0.25, np.float32)
        assert loop(x, x, 8) == pytest.approx(12 * 16 * 0.0625 * 8)
    else:
        x = np.zeros(64, np.int8)
        assert loop(x, x, 5) == 0
    fresh = njit(loop.py_func)
    assert re.search(instruction, _asm(fresh, x, x, 3))


# ---------------------------------------------------------------- CPU features

def test_detection_agrees_with_proc_cpuinfo():
    flags = cpu_features.proc_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    host = cpu_features.detect()
    assert host.vnni <= ("avx512_vnni" in flags) and host.bf16 <= ("avx512_bf16" in flags)
    assert host.avx512f <= ("avx512f" in flags)


def test_forced_removes_features_and_the_note_says_so():
    with cpu_features.forced(vnni=False, bf16=False) as f:
        assert not f.vnni and not f.bf16
        if f.score_path:
            assert f.score_path == "i16" and f.pv_path("bfloat16") == "fp32"
            assert "vpmaddwd" in f.note("bfloat16") and "no AVX512-BF16" in f.note("bfloat16")
    with cpu_features.forced(avx512f=False) as f:
        assert f.score_path is None and f.pv_path("float32") is None
        assert "simd" in f.note()
    assert cpu_features.detect() == HOST


def test_environment_override(monkeypatch):
    monkeypatch.setenv(cpu_features.ENV, "-avx512vnni, -bf16")
    f = cpu_features.detect()
    assert not f.vnni and not f.bf16 and f.avx512f == HOST.avx512f
    monkeypatch.setenv(cpu_features.ENV, "+vnni")
    with pytest.raises(ValueError, match="only removing"):
        cpu_features.detect()
    monkeypatch.setenv(cpu_features.ENV, "-sse9")
    with pytest.raises(ValueError, match="unknown feature"):
        cpu_features.detect()


def test_forced_refuses_adding_or_unknown_features():
    with pytest.raises(ValueError, match="only remove"):
        with cpu_features.forced(vnni=True):
            pass
    with pytest.raises(ValueError, match="unknown"):
        with cpu_features.forced(sse9=False):
            pass


@needs_avx512
def test_the_lessons_instruction_table_probes_every_path_this_cpu_has():
    # lesson 10's table compiles each probe fresh on operands sized for the tiles (MR
    # rows of P V: a probe sized for 4 rows once overran the heap)
    from fa_lab.tools.lowprec import speed as lowprec
    table = lowprec.instructions().set_index("path")
    assert table.loc["Q K^T, int16", "found in the assembly"] in ("vpmaddwd", "vpdpwssd")
    assert table.loc["P V, fp32", "found in the assembly"] == "vfmadd231ps"
    if HOST.vnni:
        assert table.loc["Q K^T, vnni", "found in the assembly"] == "vpdpbusd"
    if HOST.bf16:
        assert table.loc["P V, bf16", "found in the assembly"] == "vdpbf16ps"


@needs_avx512
@pytest.mark.parametrize("bq,bk,d", [(16, 40, 32), (8, 1, 64), (24, 33, 96)])
def test_pv_block_loops_compute_the_same_product(bq, bk, d):
    # the fp32 P V micro-kernel and the BLAS loop that lesson 10 times against each other
    rng = np.random.default_rng(bq + bk)
    Tr, Tc = 3, 2
    Pt = rng.random((Tr, Tc, bq, bk), np.float32)
    V = rng.standard_normal((Tc * bk, d), np.float32)
    exact = sum((Pt[it].transpose(1, 0, 2).reshape(bq, Tc * bk).astype(np.float64)
                 @ V.astype(np.float64))[0, 0] for it in range(Tr))
    assert tiles.pv_blocks_microkernel(Pt, V) == pytest.approx(exact, rel=1e-5, abs=1e-4)
    assert tiles.pv_blocks_blas(Pt, V) == pytest.approx(exact, rel=1e-5, abs=1e-4)
