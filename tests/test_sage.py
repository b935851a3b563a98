"""The SageAttention-style INT8 kernel on every instruction path (forced with
:func:`fa_lab.settings.cpu_features.forced`, so any AVX-512 machine covers the fallbacks), against
the integer reference (same quantized inputs, float64 attention) with the one tolerance
table; edge cases, auto selection, ``plan_int8`` notes and argument errors."""

import warnings

import numpy as np
import pytest

import fa_lab
from fa_lab.settings import cpu_features
from fa_lab.numerics import reference
from fa_lab.api import KernelFallbackWarning, prepare
from fa_lab.features.int8 import plan_int8, quantize_inputs
from fa_lab.numerics.testing import Case, allowed_error, assert_close
from fa_lab.registry import Stage

HOST = cpu_features.detect()
pytestmark = pytest.mark.skipif(HOST.score_path is None, reason="CPU without AVX-512BW")

#: Each removal set forces one combination of paths (scores x P V).
FORCED = {
    "vnni": {},
    "vpmaddwd": {"vnni": False},
    "vnni+fp32pv": {"bf16": False},
    "vpmaddwd+fp32pv": {"vnni": False, "bf16": False},
}

CASES = [
    Case(B=1, H=2, Nq=37, Nk=70, d=24, causal=False),  # odd N, N not a multiple of a block
    Case(B=2, H=4, H_kv=2, Nq=5, Nk=130, d=16, causal="bottom_right"),  # GQA, B > 1
    Case(B=1, H=3, H_kv=1, Nq=70, Nk=70, d=33, causal=True),  # d odd, causal top-left
    Case(B=1, H=1, Nq=1, Nk=1, d=8, causal=True),
    Case(B=1, H=2, Nq=131, Nk=97, d=64, causal="bottom_right"),  # prime N, Nq > Nk
]


def _expected(case, q, k, v, block_q, block_kv, mask=None):
    """The integer reference: the inputs quantized exactly as attention_int8 does,
    float64 attention; and the same-precision baselines (fp32 and bf16 P V)."""
    c = prepare(q, k, v, causal=case.causal, mask=mask)
    q8, sq, k8, sk, mean = quantize_inputs(c.q4, c.k4, "per_block", min(block_q, c.Nq),
                                           min(block_kv, c.Nk), True)
    qd = (q8.astype(np.float64) * sq[..., None]).reshape(q.shape)
    kd = (k8.astype(np.float64) * sk[..., None]).reshape(k.shape)
    out, lse = reference.attention(qd, kd, v, causal=case.causal, mask=mask)
    # smoothing moved the LSE by scale * q . mean (attention_int8 adds it back)
    shift = np.einsum("bhnd,bhd->bhn", c.q4.astype(np.float64),
                      np.repeat(mean[:, :, 0].astype(np.float64), c.H // c.H_kv, axis=1))
    exact = out, lse + c.scale * shift.reshape(lse.shape)
    f32 = reference.attention(qd, kd, v, causal=case.causal, mask=mask, dtype=np.float32)[0]
    bf16 = reference.attention_bf16_pv(qd, kd, v, causal=case.causal, mask=mask)
    return exact, f32, bf16


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("pv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", FORCED)
@pytest.mark.parametrize("blocks", [(None, None), (16, 40)], ids=["default", "16x40"])
def test_sage_matches_the_integer_reference_on_every_path(case, pv_dtype, path, blocks):
    if not HOST.vnni and "vnni" in path.split("+")[0] and path.startswith("vnni"):
        pytest.skip("CPU without AVX512-VNNI")
    q, k, v = case.inputs(seed=5)
    k = k + np.float32(2.0)  # an offset, so smoothing has something to remove
    bq, bk = blocks
    with cpu_features.forced(**FORCED[path]) as f:
        plan = plan_int8(q, k, v, causal=case.causal, kernel="sage", pv_dtype=pv_dtype,
                         block_q=bq, block_kv=bk)
        out, lse = fa_lab.attention_int8(q, k, v, causal=case.causal, kernel="sage",
                                         pv_dtype=pv_dtype, block_q=bq, block_kv=bk,
                                         return_lse=True)
    assert plan["score_path"] == f.score_path
    bf16 = plan["pv_path"] == "bf16"
    assert bf16 == (pv_dtype == "bfloat16" and "fp32pv" not in path)
    (eo, el), f32, b16 = _expected(case, q, k, v, plan["block_q"], plan["block_kv"])
    assert out.dtype == np.float32 and out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, eo, baseline=b16 if bf16 else f32, rule="bfloat16" if bf16 else None,
                 what=f"sage {path} {pv_dtype} out", magnitude=np.abs(v).max())
    np.testing.assert_allclose(lse, el, rtol=1e-5, atol=1e-5)  # scores are fp32 either way


def test_bf16_rule_fails_on_a_wrong_output():
    """The bf16 check is not vacuous: one element 1.5x past the allowance is refused,
    and the allowance is a small fraction of the output's scale."""
    case = CASES[0]
    q, k, v = case.inputs(seed=5)
    (eo, _), _, b16 = _expected(case, q, k, v, 64, 128)
    allowed = allowed_error(eo, b16, "bfloat16", np.abs(v).max())
    assert allowed < 0.02 * np.abs(v).max()
    wrong = b16.copy()
    wrong[0, 1, 5, 3] = eo[0, 1, 5, 3] + 1.5 * allowed
    with pytest.raises(AssertionError, match=r"index \(0, 1, 5, 3\)"):
        assert_close(wrong, eo, baseline=b16, rule="bfloat16", magnitude=np.abs(v).max())


@pytest.mark.parametrize("pv_dtype", ["float32", "bfloat16"])
def test_masks_fully_masked_rows_and_nan_in_v(pv_dtype):
    q, k, v = Case(B=1, H=2, Nq=6, Nk=40, d=8).inputs(seed=3)
    mask = np.ones((6, 40), bool)
    mask[2] = False  # row 2 sees nothing
    mask[4, 7] = False  # row 4 cannot see key 7
    v[0, 1, 7, 0] = np.nan  # head 1: rows that see key 7 turn NaN in channel 0
    expected, _ = reference.attention(q, k, v, mask=mask)
    out, lse = fa_lab.attention_int8(q, k, v, mask=mask, kernel="sage", pv_dtype=pv_dtype,
                                     return_lse=True)
    assert np.all(out[:, :, 2] == 0) and np.all(lse[:, :, 2] == -np.inf)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert not np.isnan(out[0, 1, 4]).any()  # the hidden NaN never reached row 4


@pytest.mark.parametrize("pv_dtype", ["float32", "bfloat16"])
def test_nan_in_a_value_hidden_by_causality(pv_dtype):
    c = Case(B=1, H=1, Nq=50, Nk=50, d=16)
    q, k, v = c.inputs(seed=4)
    v[0, 0, 30, 3] = np.inf
    out = fa_lab.attention_int8(q, k, v, causal=True, kernel="sage", pv_dtype=pv_dtype,
                                block_q=16, block_kv=32)
    assert np.isfinite(out[0, 0, :30]).all()  # rows before key 30 never see it
    assert np.isnan(out[0, 0, 30:, 3]).all() or not np.isfinite(out[0, 0, 30:, 3]).any()


def test_causal_skips_to_zero_rows_and_empty_keys():
    q, k, v = Case(B=1, H=2, Nq=9, Nk=4, d=8).inputs(seed=6)
    out, lse = fa_lab.attention_int8(q, k, v, causal="bottom_right", kernel="sage",
                                     return_lse=True)
    assert np.all(out[:, :, :5] == 0) and np.all(lse[:, :, :5] == -np.inf)  # Nq - Nk rows
    out = fa_lab.attention_int8(q, k[:, :, :0], v[:, :, :0], kernel="sage")
    assert out.shape == q.shape and np.all(out == 0)


def test_auto_picks_sage_and_falls_back_without_avx512():
    q, k, v = Case(B=1, H=2, Nq=20, Nk=20, d=16).inputs(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_int8(q, k, v)["kernel"] == "sage"
    with cpu_features.forced(avx512f=False):
        with pytest.warns(KernelFallbackWarning, match="AVX-512"):
            p = plan_int8(q, k, v, pv_dtype="bfloat16")
        assert p["kernel"] == "simd" and "no AVX-512" in p["note"]
        with pytest.warns(KernelFallbackWarning):
            out = fa_lab.attention_int8(q, k, v, pv_dtype="bfloat16")
        with pytest.raises(NotImplementedError, match="AVX-512"):
            fa_lab.attention_int8(q, k, v, kernel="sage")
    np.testing.assert_allclose(out, fa_lab.attention_int8(q, k, v), atol=1e-5)
    with pytest.warns(KernelFallbackWarning, match="float64"):  # sage is float32 only
        assert plan_int8(q.astype(np.float64), k.astype(np.float64),
                         v.astype(np.float64))["kernel"] == "simd"


def test_plan_notes_each_fallback():
    q, k, v = Case(B=1, H=1, Nq=8, Nk=8, d=8).inputs()
    with cpu_features.forced(vnni=False, bf16=False):
        p = plan_int8(q, k, v, pv_dtype="bfloat16")
    assert (p["score_path"], p["pv_path"]) == ("i16", "fp32")
    assert "vpmaddwd" in p["note"] and "no AVX512-BF16" in p["note"]
    if HOST.vnni and HOST.bf16:
        p = plan_int8(q, k, v, kernel="sage", pv_dtype="bfloat16")  # auto: amx with AMX
        assert (p["score_path"], p["pv_path"]) == ("vnni", "bf16")
        assert "vpdpbusd" in p["note"] and "vdpbf16ps" in p["note"]


def test_pv_dtype_errors():
    q, k, v = Case(Nq=4, d=4).inputs()
    with pytest.raises(ValueError, match="pv_dtype"):
        fa_lab.attention_int8(q, k, v, pv_dtype="float16")
    with pytest.raises(ValueError, match="pv_dtype"):
        plan_int8(q, k, v, pv_dtype=None)
    with pytest.raises(NotImplementedError, match="pv_dtype"):
        fa_lab.attention_int8(q, k, v, kernel="simd", pv_dtype="bfloat16")
    with pytest.raises(NotImplementedError, match="float64"):
        fa_lab.attention_int8(*(x.astype(np.float64) for x in (q, k, v)), kernel="sage")


# ---------------------------------------------------------------- stages and the breakdown

def _staged(q, k, v, causal, pv_dtype="bfloat16"):
    """``stage -> (out, lse)`` through the one dispatch, as the breakdown runs it."""
    c = prepare(q, k, v, causal=causal)
    q8, sq, k8, sk, _ = quantize_inputs(c.q4, c.k4, "per_block", 128, 256, True)
    return lambda stage=Stage.FULL: c.run("sage", table=fa_lab.INT8_KERNELS,
                                          arrays=(q8, sq, k8, sk, c.v4), block_q=128,
                                          block_kv=256, pv_dtype=pv_dtype, stage=stage)


@pytest.mark.parametrize("pv_dtype", ["float32", "bfloat16"])
def test_full_stage_is_the_kernel_and_earlier_stages_stop_before_p_v(pv_dtype):
    q, k, v = Case(B=1, H=2, Nq=300, Nk=300, d=32).inputs(seed=8)
    forward = _staged(q, k, v, True, pv_dtype)
    out = fa_lab.attention_int8(q, k, v, causal=True, pv_dtype=pv_dtype, kernel="sage")
    np.testing.assert_array_equal(forward()[0], out)
    np.testing.assert_array_equal(forward(Stage.FULL)[0], out)
    for stage in (Stage.PACK, Stage.LOOPS, Stage.SCORES, Stage.SOFTMAX):
        o, lse = forward(stage)  # no P V: acc stays 0 (no softmax before SOFTMAX: l = 0)
        assert np.all(o == 0)
        assert np.all(np.isfinite(lse)) == (stage == Stage.SOFTMAX)


def test_a_kernel_option_it_does_not_have_is_refused():
    q, k, v = Case(B=1, H=2, Nq=40, Nk=40, d=16).inputs(seed=2)
    c = prepare(q, k, v)
    pre = quantize_inputs(c.q4, c.k4, "per_block", 64, 64, True)
    with pytest.raises(TypeError, match="pv_dtype: not an option of kernel 'simd'"):
        c.run("simd", table=fa_lab.INT8_KERNELS, arrays=(*pre[:4], c.v4), pv_dtype="float32")
    for stage in (Stage.PACK, Stage.NO_EXP):  # flash packs nothing; ablations are AMX's
        with pytest.raises(ValueError, match="stage: flash_forward takes LOOPS..FULL"):
            c.run("flash", stage=stage)
    with pytest.raises(ValueError, match="stage: sage stops after a stage"):
        c.run("sage", table=fa_lab.INT8_KERNELS, arrays=(*pre[:4], c.v4), stage=Stage.NO_MAX)


def test_breakdown_times_each_part_of_the_real_call(monkeypatch):
    # The harness runs each contender once (so each staged call really runs) and returns
    # known times: quantize 1 ms, pack 2 ms, stage s (s + 1)^2 ms. The parts must be the
    # differences in the kernel's order, the products' rates their half of the FLOPs.
    from fa_lab.tools.lowprec import speed as lowprec
    from fa_lab.tools.bench.harness import Timings, flops
    from fa_lab.settings.machine import Load

    # each stage's call includes the packing: ends at 2, 3, 6, 11, 18 ms
    known = {"quantize": 1.0, "PACK": 2.0, "LOOPS": 3.0, "SCORES": 6.0, "SOFTMAX": 11.0,
             "FULL": 18.0}
    seen = []

    def fake_time_calls(cs, args, **kw):
        times = Timings()
        for c in cs:
            r = c.fn(*args)
            if c.name != "quantize":
                seen.append((c.name, bool(np.all(r[0] == 0))))
            times[c.name] = [known[c.name] / 1e3]
        times.load = Load(0.0, 0.0, 0.0, 0.0, 0.0)
        return times

    monkeypatch.setattr(lowprec, "time_calls", fake_time_calls)
    df = lowprec.breakdown(N=300, H=2, d=32, causal=False, repeats=2)
    assert list(df["part"]) == [p for p, _ in lowprec.BREAKDOWN_PARTS]
    np.testing.assert_allclose(df["ms"], [1, 2, 1, 3, 5, 7])
    assert df["total_ms"].iloc[0] == pytest.approx(19.0)
    np.testing.assert_allclose(df["share"], np.array([1, 2, 1, 3, 5, 7]) / 19)
    half = flops(1, 2, 300, 300, 32, False) / 2
    rates = df.set_index("part")["gops"]
    assert rates["Q K^T + masks"] == pytest.approx(half / 3e-3 / 1e9)
    assert rates["P V"] == pytest.approx(half / 7e-3 / 1e9)
    assert seen == [("PACK", True), ("LOOPS", True), ("SCORES", True), ("SOFTMAX", True),
                    ("FULL", False)]
