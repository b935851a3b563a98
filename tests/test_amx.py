"""The AMX kernels: exact tile GEMMs, the tile instructions in the assembly, INT8
(``attention_int8(kernel="amx")``) and bf16 (``attention`` on bfloat16) against the
float64 references with the one tolerance table, awkward shapes, masks and NaN, fork and
thread safety. They run where the CPU has AMX and skip with the reason elsewhere; the
choice logic (auto, fallbacks, nothing compiled without AMX) runs everywhere, with
features removed by :func:`fa_lab.settings.cpu_features.forced` or ``FA_LAB_CPU_FEATURES``."""

import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from numba import njit

import fa_lab
from fa_lab.settings import cpu_features
from fa_lab.numerics import reference
from fa_lab.api import KernelFallbackWarning, prepare
from fa_lab.features.int8 import plan_int8, quantize_inputs
from fa_lab.numerics.testing import Case, assert_close

WHY = cpu_features.amx_unavailable()
needs_amx = pytest.mark.skipif(WHY is not None, reason=f"AMX kernels skipped: {WHY}")
try:
    import ml_dtypes
    BF16 = ml_dtypes.bfloat16
except ImportError:  # the optional `models` extra
    BF16 = None
needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes (bfloat16 arrays) not installed")

CASES = [
    Case(B=1, H=1, Nq=1, Nk=1, d=64),
    Case(B=1, H=2, Nq=37, Nk=70, d=24),  # N not a multiple of 16/32, odd-ish d padded
    Case(B=1, H=2, Nq=131, Nk=97, d=64, causal="bottom_right"),  # prime N, Nq > Nk
    Case(B=1, H=2, Nq=97, Nk=131, d=64, causal=True),  # top-left, Nq < Nk
    Case(B=2, H=4, H_kv=2, Nq=5, Nk=300, d=32, causal="bottom_right"),  # GQA, B > 1
    Case(B=1, H=3, H_kv=1, Nq=70, Nk=70, d=33, causal=True),  # MQA, odd d
    Case(B=1, H=1, Nq=300, Nk=513, d=128),  # several key blocks, d = 128
]
BLOCKS = [(None, None), (16, 40)]


def _int8_expected(case, q, k, v, bq, bk, mask=None, scale=None):
    """The integer reference (same quantized inputs, float64) and the bf16 P V baseline."""
    c = prepare(q, k, v, causal=case.causal, mask=mask, scale=scale)
    q8, sq, k8, sk, mean = quantize_inputs(c.q4, c.k4, "per_block", bq, bk, True)
    qd = (q8.astype(np.float64) * sq[..., None]).reshape(q.shape)
    kd = (k8.astype(np.float64) * sk[..., None]).reshape(k.shape)
    out = reference.attention(qd, kd, v, causal=case.causal, mask=mask, scale=scale)[0]
    base = reference.attention_bf16_pv(qd, kd, v, causal=case.causal, mask=mask, scale=scale)
    return out, base


# ---------------------------------------------------------------- everywhere: choice

def test_auto_picks_amx_only_for_bf16_pv_and_only_with_amx():
    q, k, v = Case(B=1, H=2, Nq=20, Nk=20, d=16).inputs(seed=1)
    with cpu_features.forced(amx=False) as f:
        assert not f.amx_path and not f.amx_int8 and not f.amx_bf16
        assert "lacks amx" in cpu_features.amx_unavailable()
        assert plan_int8(q, k, v, pv_dtype="bfloat16")["kernel"] != "amx"
        with pytest.raises(NotImplementedError, match="no AMX path"):
            fa_lab.attention_int8(q, k, v, kernel="amx", pv_dtype="bfloat16")
        if BF16 is not None:
            with pytest.raises(NotImplementedError, match="no AMX path"):
                fa_lab.attention(q.astype(BF16), k.astype(BF16), v.astype(BF16),
                                 kernel="amx")
    with cpu_features.forced(amx_bf16=False):
        assert "amx_bf16" in cpu_features.amx_unavailable()
    assert plan_int8(q, k, v)["kernel"] != "amx"  # fp32 P V asked: never bf16 unasked
    if WHY is None:
        p = plan_int8(q, k, v, pv_dtype="bfloat16")
        assert (p["kernel"], p["score_path"], p["pv_path"]) == ("amx", "amx_int8", "amx_bf16")
        with pytest.raises(NotImplementedError, match="bf16 only"):
            fa_lab.attention_int8(q, k, v, kernel="amx")


def test_environment_removes_amx(monkeypatch):
    monkeypatch.setenv(cpu_features.ENV, "-amx-tile")
    assert not cpu_features.detect().amx_path
    assert "lacks amx" in cpu_features.amx_unavailable()
    monkeypatch.setenv(cpu_features.ENV, "+amx-tile")
    with pytest.raises(ValueError, match="only removing"):
        cpu_features.detect()


def test_a_refused_permission_makes_amx_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_features, "amx_permission", lambda: "arch_prctl failed: EPERM")
    if cpu_features.detect().amx_path:
        assert cpu_features.amx_unavailable() == ("AMX present but unusable: arch_prctl "
                                                  "failed: EPERM")
    else:
        assert "lacks" in cpu_features.amx_unavailable()


@needs_bf16
def test_without_amx_nothing_is_compiled_and_bf16_falls_back():
    """In a fresh process with AMX removed: INT8 bf16 and bfloat16 attention run on the
    other kernels, and not one AMX function was compiled (LLVM would abort)."""
    code = """
import numpy as np, ml_dtypes, warnings, fa_lab
from fa_lab.kernels.lowprec import amx, amx_pack, amx_softmax, amx_tiles
from fa_lab.numerics.testing import Case
q, k, v = Case(B=1, H=2, Nq=40, Nk=40, d=16).inputs(seed=2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fa_lab.attention_int8(q, k, v, pv_dtype="bfloat16", causal=True)
    b = [x.astype(ml_dtypes.bfloat16) for x in (q, k, v)]
    out = fa_lab.attention(*b, causal=True)
assert out.dtype == ml_dtypes.bfloat16
fns = [amx.amx_forward, amx_pack.pack_q, amx_pack.pack_k, amx_pack.pack_v, amx_tiles.tile_gemm,
       amx_tiles.peak_loop, amx_softmax.softmax_fused]
assert all(not f.signatures for f in fns), [f.__name__ for f in fns if f.signatures]
print("ok")
"""
    env = {**os.environ, cpu_features.ENV: "-amx-tile"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------- AMX machines only

@needs_amx
@pytest.mark.parametrize("op,lo", [(0, -128), (1, 0)], ids=["tdpbssd", "tdpbusd"])
def test_int8_tile_gemm_is_exact(op, lo):
    from fa_lab.kernels.lowprec.amx_tiles import FULL_CFG, tile_gemm, vnni_i8
    from fa_lab.numerics.buffers import empty64

    rng = np.random.default_rng(op)
    A = rng.integers(lo, 128 if lo < 0 else 256, (16, 64)).astype(np.int8 if lo < 0 else np.uint8)
    B = rng.integers(-128, 128, (64, 16)).astype(np.int8)
    C0 = rng.integers(-1000, 1000, (16, 16)).astype(np.int32)
    a, b, c = (empty64(x.size, x.dtype) for x in (A, B, C0))
    a[:], b[:], c[:] = A.ravel(), vnni_i8(B).ravel(), C0.ravel()
    tile_gemm(FULL_CFG, a, b, c, op)
    np.testing.assert_array_equal(c.reshape(16, 16), C0 + A.astype(np.int32) @ B.astype(np.int32))


@needs_amx
def test_bf16_tile_gemm():
    from fa_lab.kernels.lowprec.amx_tiles import FULL_CFG, tile_gemm, vnni_bf16
    from fa_lab.numerics.quant import from_bf16, to_bf16
    from fa_lab.numerics.buffers import empty64

    rng = np.random.default_rng(3)
    A, B = to_bf16(rng.standard_normal((16, 32))), to_bf16(rng.standard_normal((32, 16)))
    a, b, c = empty64(512, np.uint16), empty64(512, np.uint16), empty64(256, np.float32)
    a[:], b[:], c[:] = A.ravel(), vnni_bf16(B).ravel(), 0
    tile_gemm(FULL_CFG, a, b, c, 2)
    exact = from_bf16(A).astype(np.float64) @ from_bf16(B).astype(np.float64)
    np.testing.assert_allclose(c.reshape(16, 16), exact, rtol=1e-5, atol=1e-5)


@needs_amx
def test_the_tile_instructions_are_in_the_assembly():
    from fa_lab.kernels.lowprec import amx
    from fa_lab.kernels.lowprec.amx_tiles import FULL_CFG, tile_gemm
    from fa_lab.numerics.buffers import empty64

    fresh = njit(nogil=True)(tile_gemm.py_func)  # a fresh copy: a cached one has no assembly
    x = empty64(1024, np.uint8)
    x[:] = 0
    fresh(FULL_CFG, x, x, x, 0)
    asm = "\n".join(fresh.inspect_asm().values())
    drv = njit(**amx.amx_forward.targetoptions)(amx.amx_forward.py_func)
    q, k, v = Case(B=1, H=1, Nq=40, Nk=40, d=64).inputs(seed=1)
    fa_lab.attention_int8(q, k, v, kernel="amx", pv_dtype="bfloat16")
    drv.compile(amx.amx_forward.signatures[0])
    asm += "\n".join(drv.inspect_asm().values())
    found = set(re.findall(r"\b(tdpbssd|tdpbusd|tdpbf16ps|ldtilecfg|tilerelease|tileloadd|"
                           r"tilestored)\b", asm))
    assert {"tdpbssd", "tdpbusd", "tdpbf16ps", "ldtilecfg", "tilerelease", "tileloadd",
            "tilestored"} <= found, found


@needs_amx
@pytest.mark.parametrize("jump", [3.0, 12.0])
def test_int8_row_max_rising_late(jump):
    """A key in the last block far above every earlier score: the running max, alpha and
    the row sum must follow it."""
    case = Case(B=1, H=1, Nq=40, Nk=600, d=64)
    q, k, v = case.inputs(seed=11)
    k[0, 0, 590] = jump * q[0, 0, 3]  # row 3's score there: jump |q|^2 / 8, up to ~100
    out = fa_lab.attention_int8(q, k, v, kernel="amx", pv_dtype="bfloat16", block_kv=128)
    exact, base = _int8_expected(case, q, k, v, 40, 128)
    assert_close(out, exact, baseline=base, rule="bfloat16", magnitude=np.abs(v).max())


@needs_amx
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_other_granularities_take_the_general_softmax(granularity):
    """Keys with their own scales (per token) cannot use the fused softmax (one scale per
    block): the general path must give the integer reference too."""
    case = Case(B=1, H=2, Nq=100, Nk=300, d=64, causal=True)
    q, k, v = case.inputs(seed=9)
    out = fa_lab.attention_int8(q, k, v, causal=True, kernel="amx", pv_dtype="bfloat16",
                                granularity=granularity)
    ref = fa_lab.attention_int8(q, k, v, causal=True, kernel="reference",
                                granularity=granularity)
    base = fa_lab.attention_int8(q, k, v, causal=True, kernel="sage", pv_dtype="bfloat16",
                                 granularity=granularity)
    assert np.abs(out - ref).max() <= 2 * np.abs(base - ref).max() + 1e-6


@needs_amx
@pytest.mark.parametrize("blocks", BLOCKS, ids=["default", "16x40"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_int8_matches_the_integer_reference(case, blocks):
    q, k, v = case.inputs(seed=5)
    k = k + np.float32(2.0)  # an offset, so smoothing has something to remove
    p = plan_int8(q, k, v, causal=case.causal, kernel="amx", pv_dtype="bfloat16",
                  block_q=blocks[0], block_kv=blocks[1])
    out = fa_lab.attention_int8(q, k, v, causal=case.causal, kernel="amx", pv_dtype="bfloat16",
                                block_q=blocks[0], block_kv=blocks[1])
    exact, base = _int8_expected(case, q, k, v, p["block_q"], p["block_kv"])
    assert out.dtype == np.float32 and out.shape == q.shape
    assert_close(out, exact, baseline=base, rule="bfloat16", what=f"amx int8 {case.id}",
                 magnitude=np.abs(v).max())


@needs_amx
@needs_bf16
@pytest.mark.parametrize("blocks", BLOCKS, ids=["default", "16x40"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bf16_attention_matches_the_reference(case, blocks):
    q, k, v = (x.astype(BF16) for x in case.inputs(seed=6))
    out, lse = fa_lab.attention(q, k, v, causal=case.causal, kernel="amx", block_q=blocks[0],
                                block_kv=blocks[1], return_lse=True)
    wide = [x.astype(np.float64) for x in (q, k, v)]
    exact, exact_lse = reference.attention(*wide, causal=case.causal)
    base, _ = reference.attention_half(q, k, v, dtype=BF16, causal=case.causal)
    assert out.dtype == BF16 and out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, exact, baseline=base, what=f"amx bf16 {case.id}")
    np.testing.assert_allclose(lse.astype(np.float64), exact_lse, rtol=2e-2, atol=2e-2)
    auto = fa_lab.attention(q, k, v, causal=case.causal, block_q=blocks[0], block_kv=blocks[1])
    np.testing.assert_array_equal(auto.view(np.uint16), out.view(np.uint16))


@needs_amx
@pytest.mark.parametrize("path", ["int8", "bf16"])
def test_masks_fully_masked_rows_nan_values_and_negative_scale(path):
    q, k, v = Case(B=1, H=2, Nq=6, Nk=40, d=8).inputs(seed=3)
    mask = np.ones((6, 40), bool)
    mask[2] = False  # row 2 sees nothing
    mask[4, 7] = False  # row 4 cannot see key 7
    v[0, 1, 7, 0] = np.nan  # head 1: rows that see key 7 turn NaN in channel 0

    if path == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes (bfloat16 arrays) not installed")

    def run(**kw):
        if path == "int8":
            return fa_lab.attention_int8(q, k, v, kernel="amx", pv_dtype="bfloat16",
                                         return_lse=True, **kw)
        o, s = fa_lab.attention(*(x.astype(BF16) for x in (q, k, v)), kernel="amx",
                                return_lse=True, **kw)
        return o.astype(np.float32), s.astype(np.float32)
    out, lse = run(mask=mask)
    expected, _ = reference.attention(q, k, v, mask=mask)
    assert np.all(out[:, :, 2] == 0) and np.all(lse[:, :, 2] == -np.inf)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert not np.isnan(out[0, 1, 4]).any()  # the hidden NaN never reached row 4
    v[0, 1, 7, 0] = 0
    out, _ = run(scale=-0.3)  # a negative scale: the general softmax path
    exp, _ = reference.attention(q, k, v, scale=-0.3)
    assert np.abs(out - exp).max() < 0.05


@needs_amx
def test_nan_value_hidden_by_causality_and_empty_keys():
    q, k, v = Case(B=1, H=1, Nq=50, Nk=50, d=16).inputs(seed=4)
    v[0, 0, 30, 3] = np.inf
    out = fa_lab.attention_int8(q, k, v, causal=True, kernel="amx", pv_dtype="bfloat16",
                                block_q=16, block_kv=32)
    assert np.isfinite(out[0, 0, :30]).all()  # rows before key 30 never see it
    out, lse = fa_lab.attention_int8(q, k[:, :, :0], v[:, :, :0], kernel="amx",
                                     pv_dtype="bfloat16", return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)


@needs_amx
@pytest.mark.parametrize("path", ["int8", "bf16"])
def test_a_nan_past_a_one_row_blocks_diagonal_stays_hidden(path):
    """A query block of one row stops at its diagonal: the keys up to the next 32 are then
    real keys with P = 0, and a NaN value among them must not reach the row (0 x NaN)."""
    if path == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes (bfloat16 arrays) not installed")
    q, k, v = Case(B=1, H=1, Nq=65, Nk=200, d=64).inputs(seed=9)
    v[0, 0, 70] = np.nan  # row 64 (alone in its block) sees keys 0..64 only
    if path == "int8":
        out = fa_lab.attention_int8(q, k, v, causal=True, kernel="amx", pv_dtype="bfloat16")
    else:
        out = fa_lab.attention(*(x.astype(BF16) for x in (q, k, v)), causal=True,
                               kernel="amx").astype(np.float32)
    exact = reference.attention(q, k, v, causal=True)[0]
    assert np.isfinite(out).all()
    assert np.abs(out - exact).max() < 0.05


def _amx_call(seed):
    q, k, v = Case(B=1, H=2, Nq=130, Nk=130, d=64).inputs(seed=seed)
    return fa_lab.attention_int8(q, k, v, causal=True, kernel="amx", pv_dtype="bfloat16")


def _child(expected, queue):
    queue.put(bool(np.array_equal(_amx_call(7), expected)))


@needs_amx
def test_fork_after_an_amx_call():
    expected = _amx_call(7)  # the parent's thread pool and tile permission exist now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(expected, queue))
    p.start()
    p.join(120)
    assert p.exitcode == 0, f"forked child exit code {p.exitcode} (-4: SIGILL)"
    assert queue.get(timeout=5) is True


@needs_amx
@needs_bf16
def test_two_threads_give_bitwise_single_thread_results():
    expected = {s: _amx_call(s) for s in (1, 2)}
    q, k, v = (x.astype(BF16) for x in Case(B=1, H=2, Nq=70, Nk=90, d=32).inputs(seed=3))
    expected_bf16 = fa_lab.attention(q, k, v, kernel="amx")
    errors = []

    def work(seed):
        try:
            for _ in range(3):
                np.testing.assert_array_equal(_amx_call(seed), expected[seed])
                np.testing.assert_array_equal(fa_lab.attention(q, k, v, kernel="amx").view(
                    np.uint16), expected_bf16.view(np.uint16))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


# ---------------------------------------------------------------- the benchmark's arithmetic

def test_the_amx_benchmark_refuses_without_amx():
    from fa_lab.tools.lowprec import amx as amx_bench

    with cpu_features.forced(amx=False):
        for fn in (amx_bench.peaks, amx_bench.instructions, amx_bench.sweep):
            with pytest.raises(NotImplementedError, match="no AMX path"):
                fn()


def _runs_once(known):
    """A harness that runs each contender once (so each staged call really runs) and
    reports ``known[name]`` milliseconds for it."""
    from fa_lab.settings.machine import Load
    from fa_lab.tools.bench.harness import Timings

    def fake_time_calls(cs, args, **kw):
        times = Timings()
        for c in cs:
            c.fn(*args)
            times[c.name] = [known[c.name] / 1e3]
        times.load = Load(0.0, 0.0, 0.0, 0.0, 0.0)
        return times
    return fake_time_calls


@needs_amx
@pytest.mark.parametrize("path", ["int8", "bf16"])
def test_breakdown_parts_are_the_stage_differences(monkeypatch, path):
    # Known times (prepare 1 ms, stage s = -1..3: (s + 2)^2 ms) through a harness that
    # runs each staged call once: the parts are the differences in the kernel's order.
    if path == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes (bfloat16 arrays) not installed")
    from fa_lab.tools.lowprec import amx as amx_bench
    from fa_lab.tools.bench.harness import flops

    known = {"prepare": 1.0, **{f"stage{s}": (s + 2) ** 2 for s in range(-1, 4)}}
    monkeypatch.setattr(amx_bench, "time_calls", _runs_once(known))
    df = amx_bench.breakdown(N=300, H=2, d=64, causal=True, path=path, repeats=1)
    assert list(df["part"]) == amx_bench.PARTS
    np.testing.assert_allclose(df["ms"], [1, 1, 3, 5, 7, 9])
    np.testing.assert_allclose(df["share"], np.array([1, 1, 3, 5, 7, 9]) / 26)
    rates = df.set_index("part")["gops"]
    half = flops(1, 2, 300, 300, 64, True) / 2
    assert rates["Q K^T (tiles)"] == pytest.approx(half / 5e-3 / 1e9)
    assert rates["P V (tiles)"] == pytest.approx(half / 9e-3 / 1e9)


@needs_amx
@pytest.mark.parametrize("path", ["int8", "bf16"])
def test_ablations_remove_their_pass_and_nothing_else(monkeypatch, path):
    """Each ablation stage changes the output (its pass really is skipped: a plumbing
    that ignored it would time the whole kernel twice), FULL is the attention, and the
    table's savings are relative to the whole kernel's median."""
    if path == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes (bfloat16 arrays) not installed")
    from fa_lab.kernels.common import Stage
    from fa_lab.registry import BF16_KERNELS, INT8_KERNELS
    from fa_lab.tools.lowprec import amx as amx_bench

    case = Case(B=1, H=2, Nq=150, Nk=300, d=64, causal=True)
    q, k, v = case.inputs(seed=5)
    call = prepare(q, k, v, causal=True)
    kernel = INT8_KERNELS["amx"] if path == "int8" else BF16_KERNELS["amx"]
    if path == "int8":
        arrays = (*quantize_inputs(call.q4, call.k4, "per_block", 64, 256, True)[:4], call.v4)
        extra = {"pv_dtype": "bfloat16"}
    else:
        arrays, extra = (call.q4, call.k4, call.v4), {}
    outs = {st: kernel.run(arrays, call.bias, call.scale, call.alignment, 64, 256, stage=st,
                           **extra)[0] for st in (Stage.FULL, Stage.NO_EXP, Stage.NO_MAX,
                                                  Stage.NO_SOFTMAX)}
    full = outs.pop(Stage.FULL)
    exact = reference.attention(q, k, v, causal=True)[0]
    assert np.abs(full - exact).max() < 0.05
    for st, out in outs.items():
        assert not np.allclose(out, full, atol=1e-3, equal_nan=True), st.name

    known = {"whole kernel": 10.0, "without the exp pass": 6.0, "without the max pass": 9.0,
             "without the softmax": 4.0}

    monkeypatch.setattr(amx_bench, "time_calls", _runs_once(known))
    df = amx_bench.ablation(N=300, H=2, d=64, causal=True, path=path, repeats=1)
    assert list(df["variant"]) == [name for name, _ in amx_bench.ABLATIONS]
    np.testing.assert_allclose(df["ms"], [10, 6, 9, 4])
    np.testing.assert_allclose(df["saved"], [0, 0.4, 0.1, 0.6])


# ---------------------------------------------------------------- torch bf16 tensors
@needs_amx
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=lambda c: c.id)
def test_torch_bf16_inference_runs_on_the_tiles(case, monkeypatch):
    """A torch bf16 call with no gradient goes to the AMX kernel, its tensors' bits shared
    (no widening), and matches fa_lab's bfloat16 NumPy call bit for bit; with a gradient
    it takes the float32 path (the backward needs it) and is close to float64 too. (The
    cases have no fully masked row, where SDPA's NaN could not serve as the baseline.)"""
    torch_ = pytest.importorskip("torch")
    from fa_lab.integrations import torch as fa_torch
    from fa_lab import api
    from fa_lab.numerics.masks import causal_mask

    q, k, v = (torch_.from_numpy(x).to(torch_.bfloat16) for x in case.inputs(seed=8))
    seen = []
    real = api.attention_bf16_bits
    monkeypatch.setattr(fa_torch, "attention_bf16_bits",
                        lambda *a, **kw: seen.append(a[0].dtype) or real(*a, **kw))
    out, lse = fa_torch.attention(q, k, v, causal=case.causal, return_lse=True)
    assert seen == [np.int16] and out.dtype == torch_.bfloat16 and lse.dtype == torch_.bfloat16
    wide = [x.float().numpy().astype(np.float64) for x in (q, k, v)]
    exact, _ = reference.attention(*wide, causal=case.causal)
    if BF16 is not None:  # the NumPy bfloat16 call: the same kernel, the same bits
        b = [x.float().numpy().astype(BF16) for x in (q, k, v)]
        mine = fa_lab.attention(*b, causal=case.causal)
        np.testing.assert_array_equal(out.view(torch_.int16).numpy(), mine.view(np.int16))
    ref = torch_.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=False, enable_gqa=case.H_kv not in (None, case.H),
        attn_mask=None if not case.causal else torch_.from_numpy(
            causal_mask(case.Nq, case.Nk, case.causal)))
    err, torch_err = (np.abs(x.float().numpy() - exact).max() for x in (out, ref))
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    qg = q.clone().requires_grad_(True)
    seen.clear()
    out_g = fa_torch.attention(qg, k, v, causal=case.causal)
    out_g.float().sum().backward()
    assert seen == [] and qg.grad is not None
    assert np.abs(out_g.detach().float().numpy() - exact).max() <= 2 * torch_err + 1e-2
