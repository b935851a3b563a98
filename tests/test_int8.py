"""INT8 attention: quantization, the integer reference, the int8 kernels, smoothing,
accuracy floors (that fail when smoothing breaks), errors, and the captured MiniLM data."""

import numpy as np
import pytest

import fa_lab
from fa_lab.tools.lowprec import study as int8_study
from fa_lab.numerics import quant, reference
from fa_lab.lessons import simd
from fa_lab.api import prepare
from fa_lab.features.int8 import quantize_inputs
from fa_lab.kernels.lowprec import int8 as k8
from fa_lab.registry import INT8_KERNELS
from fa_lab.numerics.testing import Case, assert_close

#: bf16-only P V kernels (``amx``) have their own bf16 baselines: tests/test_amx.py.
INT8_NAMES = [n for n in INT8_KERNELS if n != "reference"
              and "bf16_pv" not in INT8_KERNELS[n].tags]


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("granularity,block", [("per_tensor", None), ("per_token", None),
                                               ("per_block", 5), ("per_block", 64)])
def test_quantize_round_trip_and_shapes(granularity, block):
    x = np.random.default_rng(0).standard_normal((2, 3, 13, 7)).astype(np.float32) * 3
    xq, s = fa_lab.quantize(x, granularity, block)
    assert xq.dtype == np.int8 and s.dtype == np.float32 and xq.shape == x.shape
    expected = (1, 1, 1, 1) if granularity == "per_tensor" else (2, 3, 13, 1)
    assert s.shape == expected
    assert np.abs(xq.astype(int)).max() <= 127
    np.testing.assert_array_equal(fa_lab.dequantize(xq, s), xq.astype(np.float32) * s)
    assert np.all(np.abs(fa_lab.dequantize(xq, s) - x) <= s / 2 * (1 + 1e-6))
    # every group's largest magnitude maps to +-127
    assert np.abs(xq).max() == 127


def test_per_block_scales_are_the_block_absmax():
    x = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    _, s = quant.quantize(x, "per_block", 4)
    for b0 in range(0, 10, 4):
        rows = s[b0:b0 + 4, 0]
        assert np.all(rows == rows[0])
        assert rows[0] == pytest.approx(np.abs(x[b0:b0 + 4]).max() / 127, rel=1e-6)


def test_all_zero_group_gets_scale_one():
    x = np.zeros((3, 4), np.float32)
    x[2] = 1.0
    xq, s = quant.quantize(x, "per_token")
    assert s[0, 0] == 1.0 and np.all(xq[0] == 0) and np.all(xq[2] == 127)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=np.ones((3, 4), np.int32)), TypeError, "float"),
    (dict(x=np.ones(4, np.float32)), ValueError, r"\(\.\.\., N, d\)"),
    (dict(x=np.ones((3, 4)), granularity="per_row"), ValueError, "granularity"),
    (dict(x=np.ones((3, 4)), granularity="per_block", block=2.5), TypeError, "block"),
    (dict(x=np.ones((3, 4)), granularity="per_block", block=0), ValueError, "block"),
    (dict(x=np.ones((3, 4)), granularity="per_token", block=4), ValueError, "block"),
    (dict(x=np.array([[1.0, np.nan]])), ValueError, "finite"),
    (dict(x=np.array([[1.0, np.inf]]), granularity="per_token"), ValueError, "finite"),
])
def test_quantize_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quant.quantize(**kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("granularity,block", [("per_token", 1), ("per_block", 5),
                                               ("per_block", 128), ("per_block", 300)])
def test_compiled_quantization_equals_numpy_exactly(dtype, granularity, block):
    """The compiled path multiplies by the reciprocal of the scale and falls back to
    division near a tie: the integers and scales must be NumPy's, ties included."""
    rng = np.random.default_rng(block)
    x = (rng.standard_normal((2, 3, 257, 24)) * 3).astype(dtype)
    x[0, 0] = rng.integers(-127, 128, (257, 24)) / 2  # halves of integers: exact ties
    x[0, 0, 0, 0] = 63.5  # a scale of exactly 0.5
    x[1, 2, :9] = 0  # all-zero groups (scale 1)
    xq, s = quant.quantize(x, granularity, None if granularity == "per_token" else block,
                           scale_dtype=np.float64)
    q8, sq, _, _, _ = quantize_inputs(x, x, granularity, block, block, False)
    np.testing.assert_array_equal(q8, xq)
    np.testing.assert_array_equal(sq, np.broadcast_to(s, x.shape[:-1] + (1,))[..., 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("granularity,block", [("per_token", 1), ("per_block", 7),
                                               ("per_block", 300)])
def test_compiled_smoothing_equals_numpy_exactly(dtype, granularity, block):
    """The compiled quantizer subtracts K's channel mean group by group (no smoothed
    copy): its keys, scales and mean must be NumPy's ``smooth_k`` then ``quantize``, up to
    the mean's last bit (summed in another order), so compare against that same mean."""
    rng = np.random.default_rng(block + 1)
    k = (rng.standard_normal((2, 3, 301, 24)) * 3 + 5).astype(dtype)
    _, _, k8, sk, mean = quantize_inputs(k, k, granularity, block, block, True)
    assert mean.shape == (2, 3, 1, 24) and mean.dtype == dtype
    np.testing.assert_allclose(mean, quant.smooth_k(k)[1], rtol=1e-6)
    kq, s = quant.quantize((k - mean).astype(dtype), granularity,
                           None if granularity == "per_token" else block,
                           scale_dtype=np.float64)
    np.testing.assert_array_equal(k8, kq)
    np.testing.assert_array_equal(sk, np.broadcast_to(s, k.shape[:-1] + (1,))[..., 0])


def test_compiled_quantization_of_subnormal_scales_divides():
    """A group whose scale is subnormal has no finite reciprocal: the compiled path must
    divide (NumPy's integers), not multiply by infinity."""
    x = np.zeros((1, 2, 4, 3))
    x[0, 0] = [[1e-306, -3e-307, 0], [2e-307, 0, 5e-308], [0, 0, 0], [1e-307, 0, 0]]
    x[0, 1] = 1.0
    xq, s = quant.quantize(x, "per_token", scale_dtype=np.float64)
    q8, sq, _, _, _ = quantize_inputs(x, x, "per_token", 1, 1, False)
    assert np.all(sq[0, 0, [0, 1, 3]] < np.finfo(np.float64).tiny)  # subnormal scales
    np.testing.assert_array_equal(q8, xq)


@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", ["q", "k"])
def test_non_finite_input_is_named_on_every_path(granularity, bad, name):
    q, k, v = Case(Nq=40, Nk=40, d=8).inputs()
    {"q": q, "k": k}[name][0, 1, 33, 5] = bad
    for smooth in (True, False):
        with pytest.raises(ValueError, match=f"^{name}: .*finite"):
            fa_lab.attention_int8(q, k, v, granularity=granularity, smooth_k=smooth)


def test_dequantize_wants_int8():
    with pytest.raises(TypeError, match="int8"):
        quant.dequantize(np.ones((2, 2), np.int16), 1.0)


# ---------------------------------------------------------------- the kernels

CASES = [
    Case(B=1, H=2, Nq=37, Nk=70, d=24, causal=False),
    Case(B=2, H=4, H_kv=2, Nq=5, Nk=130, d=16, causal="bottom_right"),
    Case(B=1, H=3, H_kv=1, Nq=70, Nk=70, d=33, causal=True),
    Case(B=1, H=1, Nq=1, Nk=1, d=8, causal=True),
]


def _int_reference(q, k, v, granularity, smooth, causal, mask=None, block=64, block_kv=None):
    c = prepare(q, k, v, causal=causal, mask=mask)
    q8, sq, kq8, sk, _ = quantize_inputs(c.q4, c.k4, granularity, min(block, c.Nq),
                                         min(block_kv or block, c.Nk), smooth)
    qd = (q8.astype(np.float64) * sq[..., None]).reshape(q.shape)
    kd = (kq8.astype(np.float64) * sk[..., None]).reshape(k.shape)
    exp = reference.attention(qd, kd, v, causal=causal, mask=mask)
    base = reference.attention(qd, kd, v, causal=causal, mask=mask, dtype=q.dtype.type)
    return exp, base


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("name", INT8_NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_int8_kernels_match_the_integer_reference(case, granularity, name, dtype):
    kernel = INT8_KERNELS[name]
    if np.dtype(dtype) not in [np.dtype(t) for t in kernel.dtypes]:
        pytest.skip(f"{name} is {[np.dtype(t).name for t in kernel.dtypes]} only")
    q, k, v = case.inputs(dtype=dtype, seed=2)
    if kernel.unsupported(prepare(q, k, v).request):
        pytest.skip(f"{name} cannot run on this CPU")
    k = k + dtype(2.0)  # an offset, so smoothing has something to remove
    bq, bk = kernel.default_blocks or (64, 64)
    (eo, el), (bo, bl) = _int_reference(q, k, v, granularity, True, case.causal, block=bq,
                                        block_kv=bk)
    out, lse = fa_lab.attention_int8(q, k, v, causal=case.causal, granularity=granularity,
                                     kernel=name, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_close(out, eo, baseline=bo, what=f"int8 {name} out", magnitude=np.abs(v).max())


def test_naive_is_exact_against_the_integer_reference_in_float64():
    q, k, v = Case(B=1, H=2, Nq=20, Nk=50, d=16).inputs(dtype=np.float64, seed=4)
    (eo, _), _ = _int_reference(q, k, v, "per_token", False, False)
    out = fa_lab.attention_int8(q, k, v, granularity="per_token", smooth_k=False, kernel="naive")
    np.testing.assert_allclose(out, eo, rtol=1e-12, atol=1e-13)


def test_masks_fully_masked_rows_and_nan_in_v():
    q, k, v = Case(B=1, H=2, Nq=6, Nk=40, d=8).inputs(seed=3)
    mask = np.ones((6, 40), bool)
    mask[2] = False
    v[0, 1, 7, 0] = np.nan  # NaN in V: the head-1 rows that see key 7 turn NaN in that
    expected, _ = reference.attention(q, k, v, mask=mask)  # channel; masked row 2 stays 0
    for name in INT8_NAMES:
        out, lse = fa_lab.attention_int8(q, k, v, mask=mask, kernel=name, return_lse=True)
        assert np.all(out[:, :, 2] == 0) and np.all(lse[:, :, 2] == -np.inf)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(expected) & (mask[:, :, None]
                                                                             .any(axis=1)))
        assert not np.isnan(out[0, 0]).any() and np.isfinite(lse).sum() == 10


@pytest.mark.parametrize("name", ["q", "k"])
def test_non_finite_q_or_k_is_a_clear_error(name):
    q, k, v = Case(Nq=4, d=4).inputs()
    {"q": q, "k": k}[name][0, 0, 1, 2] = np.inf
    with pytest.raises(ValueError, match=f"^{name}: .*finite"):
        fa_lab.attention_int8(q, k, v)


def test_int8_argument_errors():
    q, k, v = Case(Nq=4, d=4).inputs()
    with pytest.raises(ValueError, match="granularity"):
        fa_lab.attention_int8(q, k, v, granularity="per_row")
    with pytest.raises(TypeError, match="smooth_k"):
        fa_lab.attention_int8(q, k, v, smooth_k="yes")
    with pytest.raises(ValueError, match="head dimension"):
        fa_lab.attention_int8(q, k[..., :3], v[..., :3])
    with pytest.raises(ValueError, match="kernel must be"):
        fa_lab.attention_int8(q, k, v, kernel="flash")
    with pytest.raises(TypeError, match="float32 or float64"):
        fa_lab.attention_int8(q.astype(np.int8), k, v)
    out = fa_lab.attention_int8(q[:, :, :0], k, v)  # Nq = 0: empty result
    assert out.shape == (1, 2, 0, 4)


def test_simd_kernel_uses_integer_vector_dot_products():
    a = np.ones((4, 64), np.int8)
    k8.scores_block_i8(a, a, np.empty((4, 4), np.int32))
    asm = simd.assembly(k8.scores_block_i8)
    assert "vpmaddwd" in asm or "vpdpwssd" in asm or "vpdpbusd" in asm, asm[:2000]


# ---------------------------------------------------------------- smoothing

def test_smoothing_is_exact_in_real_arithmetic_and_moves_only_the_lse():
    q, k, v = int8_study.synthetic("k_offset", H=2, N=60, d=16)
    ks, mean = quant.smooth_k(k.astype(np.float64))
    o1, l1 = reference.attention(q, k, v)
    o2, l2 = reference.attention(q, ks, v)
    np.testing.assert_allclose(o2, o1, rtol=1e-10, atol=1e-12)
    shift = np.einsum("bhnd,bhd->bhn", q.astype(np.float64), mean[:, :, 0]) / np.sqrt(16)
    np.testing.assert_allclose(l1 - l2, shift, rtol=1e-9, atol=1e-9)
    assert np.abs(shift).max() > 1  # the test data really has an offset


@pytest.mark.parametrize("name", INT8_NAMES)
def test_lse_is_corrected_after_smoothing(name):
    q, k, v = int8_study.synthetic("k_offset", H=2, N=60, d=16)
    _, exp_lse = reference.attention(q, k, v)
    _, lse = fa_lab.attention_int8(q, k, v, kernel=name, return_lse=True)
    assert np.abs(lse - exp_lse).max() < 0.05  # uncorrected, it is off by the shift (> 1)


def test_accuracy_floors_smoothing_must_help_on_offset_keys():
    table = int8_study.accuracy_table(["k_offset"], N=256, H=2).set_index("variant")
    for g in quant.GRANULARITIES:
        raw, smooth = table.loc[f"int8 {g}"], table.loc[f"int8 {g} + smooth K"]
        assert smooth["cosine"] >= 0.9998, g
        assert smooth["rel_l1"] < 0.7 * raw["rel_l1"], g
    assert table.loc["fp32 (flash)", "cosine"] > 0.9999999


def test_accuracy_floor_on_real_minilm_activations():
    df = int8_study.real_accuracy()
    assert set(df["layer"]) == set(range(6))
    assert df["cosine"].min() >= 0.9998
    assert (df["rel_l1"] < 0.05).all()


def test_metrics_of_identical_arrays():
    x = np.arange(1, 7, dtype=float)
    m = int8_study.metrics(x, x)
    assert m["cosine"] == pytest.approx(1) and m["rel_l1"] == 0 and m["max_error"] == 0


def test_key_bytes_and_speed_study_run():
    kb = int8_study.key_bytes(1, 8, 4096, 64)
    assert kb["int8"] * 4 == kb["fp32"] and kb["ratio"] < 0.26
    qk, att = int8_study.loop_speed(N=128, H=2, d=16, repeats=1, block=32)
    assert len(qk) == 2 and len(att) == 4
    np.testing.assert_allclose(att["speed_vs_tiled_simd"],
                               att["median_ms"].iloc[2] / att["median_ms"])
    ops = 2.0 * 128 ** 2 * 16  # one head's every 32 x 32 tile
    np.testing.assert_allclose(qk["gops"], ops / (qk["median_ms"] / 1e3) / 1e9)


# ---------------------------------------------------------------- MiniLM data

def test_captured_minilm_activations():
    cap = fa_lab.features.minilm.load_captured()
    assert len(cap["q"]) == len(cap["sentences"]) == len(cap["tokens"])
    for q, k, v, T in zip(cap["q"], cap["k"], cap["v"], cap["tokens"]):
        for x in (q, k, v):
            assert x.shape == (6, 12, T, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    check = cap["meta"]["check_against_transformers"]
    assert check["max_abs_diff"] < 1e-5 and check["min_cosine"] > 0.99999


def test_numpy_encoder_runs_and_captures_attention_inputs():
    from fa_lab.features import minilm

    rng = np.random.default_rng(0)
    H, I = minilm.HIDDEN, 4 * minilm.HIDDEN
    w = {"embeddings.word_embeddings.weight": rng.standard_normal((50, H)) * 0.1,
         "embeddings.position_embeddings.weight": rng.standard_normal((16, H)) * 0.1,
         "embeddings.token_type_embeddings.weight": rng.standard_normal((2, H)) * 0.1,
         "embeddings.LayerNorm.weight": np.ones(H), "embeddings.LayerNorm.bias": np.zeros(H)}
    for i in range(minilm.LAYERS):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"] = rng.standard_normal((H, H)) * 0.05
            w[p + f"attention.self.{n}.bias"] = np.zeros(H)
        w[p + "attention.output.dense.weight"] = rng.standard_normal((H, H)) * 0.05
        w[p + "attention.output.dense.bias"] = np.zeros(H)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = np.ones(H), np.zeros(H)
        w[p + "intermediate.dense.weight"] = rng.standard_normal((I, H)) * 0.05
        w[p + "intermediate.dense.bias"] = np.zeros(I)
        w[p + "output.dense.weight"] = rng.standard_normal((H, I)) * 0.05
        w[p + "output.dense.bias"] = np.zeros(H)
    capture = []
    x = minilm.encode(np.array([1, 5, 7, 2]), w, capture=capture)
    assert x.shape == (4, H) and len(capture) == minilm.LAYERS
    assert capture[0][1].shape == (12, 4, 32)
    e = minilm.sentence_embedding(x)
    assert np.linalg.norm(e) == pytest.approx(1.0)
    # LayerNorm output: zero mean, unit variance per token
    np.testing.assert_allclose(x.mean(axis=-1), 0, atol=1e-6)
