"""KV cache, decode, RoPE, the tiny decoder (cache == recomputation), top-K retrieval,
presets. Behaviour and errors only; timings live in lesson 08."""

import numpy as np
import pytest

import fa_lab
from fa_lab.tools import bench, presets, tune
from fa_lab.numerics import reference
from fa_lab.features import retrieval
from fa_lab.tools.bench import decode_latency, time_generation
from fa_lab.features.decoding import TinyLM
from fa_lab.numerics.testing import assert_close


def _rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- KV cache

def test_cache_append_views_and_overflow():
    c = fa_lab.KVCache(2, 3, 10, 4)
    assert c.length == 0 and c.keys.shape == (2, 3, 0, 4) and c.max_len == 10
    k, v = _rand(2, 3, 6, 4), _rand(2, 3, 6, 4, seed=1)
    assert c.append(k, v) == 6
    np.testing.assert_array_equal(c.keys, k)
    np.testing.assert_array_equal(c.values, v)
    with pytest.raises(ValueError):
        c.keys[0, 0, 0, 0] = 1.0  # read-only views
    with pytest.raises(ValueError, match="overflow.*max_len=10"):
        c.append(_rand(2, 3, 5, 4), _rand(2, 3, 5, 4))
    assert c.length == 6  # nothing written
    c.append(k[:, :, :4], v[:, :, :4])
    assert c.length == 10 and c.nbytes == 2 * 2 * 3 * 10 * 4 * 4
    c.reset()
    assert c.length == 0 and "0/10" in repr(c)


@pytest.mark.parametrize("args,exc,match", [
    ((0, 1, 4, 4), ValueError, "B must be >= 1"),
    ((1, 1.5, 4, 4), TypeError, "H_kv must be an int"),
    ((1, 1, -1, 4), ValueError, "max_len"),
])
def test_cache_constructor_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        fa_lab.KVCache(*args)
    with pytest.raises(TypeError, match="dtype"):
        fa_lab.KVCache(1, 1, 4, 4, dtype=np.int32)


def test_cache_append_shape_errors():
    c = fa_lab.KVCache(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"k_new must have shape \(B=1, H_kv=2, T, d=4\)"):
        c.append(_rand(1, 3, 2, 4), _rand(1, 3, 2, 4))
    with pytest.raises(ValueError, match="v_new must have the shape"):
        c.append(_rand(1, 2, 2, 4), _rand(1, 2, 3, 4))
    with pytest.raises(TypeError, match="float"):
        c.append(np.ones((1, 2, 2, 4), int), np.ones((1, 2, 2, 4), int))


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("B,H,H_kv,Tq,L,d", [(1, 8, 8, 1, 4096, 64), (2, 4, 2, 3, 301, 16),
                                              (1, 1, 1, 1, 1, 8), (1, 6, 3, 5, 5, 12)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_decode_matches_bottom_right_attention(B, H, H_kv, Tq, L, d, dtype):
    c = fa_lab.KVCache(B, H_kv, L + 7, d, dtype)  # spare room: decode must use only L keys
    k, v = _rand(B, H_kv, L, d, dtype=dtype), _rand(B, H_kv, L, d, seed=1, dtype=dtype)
    c.append(k, v)
    q = _rand(B, H, Tq, d, seed=2, dtype=dtype)
    out, lse = fa_lab.decode(q, c, return_lse=True)
    exp, exp_lse = reference.attention(q, k, v, causal="bottom_right")
    base, _ = reference.attention(q, k, v, causal="bottom_right", dtype=dtype)
    assert_close(out, exp, baseline=base, what="decode", magnitude=np.abs(v).max())
    np.testing.assert_allclose(lse, exp_lse, rtol=1e-5, atol=1e-5)
    for splits in (1, 3):  # forced split-KV plans give the same answer
        assert_close(fa_lab.decode(q, c, splits=splits), exp, baseline=base, what="splits",
                     magnitude=np.abs(v).max())


def test_decode_errors():
    c = fa_lab.KVCache(1, 2, 8, 4)
    c.append(_rand(1, 2, 3, 4), _rand(1, 2, 3, 4))
    with pytest.raises(TypeError, match="KVCache"):
        fa_lab.decode(_rand(1, 2, 1, 4), "cache")
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        fa_lab.decode(_rand(1, 3, 1, 4), c)
    with pytest.raises(ValueError, match=r"shape \(B=1, H, Tq, d=4\)"):
        fa_lab.decode(_rand(1, 2, 1, 5), c)
    with pytest.raises(TypeError, match="dtype"):
        fa_lab.decode(_rand(1, 2, 1, 4, dtype=np.float64), c)
    with pytest.raises(ValueError, match="append the new tokens"):
        fa_lab.decode(_rand(1, 2, 4, 4), c)
    assert fa_lab.decode(_rand(1, 2, 0, 4), c).shape == (1, 2, 0, 4)


# ---------------------------------------------------------------- RoPE

def _rope_complex(x, pos, base, interleaved):
    """An independent float64 reference: channel pairs as complex numbers."""
    x = x.astype(np.float64)
    d = x.shape[-1]
    theta = base ** (-np.arange(0, d, 2) / d)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) if interleaved else (x[..., :d // 2] + 1j * x[..., d // 2:])
    z = z * np.exp(1j * np.asarray(pos, float)[..., None] * theta)
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., :d // 2], out[..., d // 2:] = z.real, z.imag
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_the_complex_reference(interleaved):
    x = _rand(2, 3, 7, 10, dtype=np.float64)
    pos = np.array([0, 1, 2, 5, 9, 100, 4096])
    np.testing.assert_allclose(fa_lab.rope(x, pos, interleaved=interleaved),
                               _rope_complex(x, pos, 10000.0, interleaved), atol=1e-12)
    x32 = x.astype(np.float32)
    assert fa_lab.rope(x32, pos, base=500.0).dtype == np.float32


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_the_position_difference(interleaved):
    q, k = _rand(1, 16, dtype=np.float64), _rand(1, 16, seed=1, dtype=np.float64)

    def score(m, n):
        return float(fa_lab.rope(q, [m], interleaved=interleaved)[0]
                     @ fa_lab.rope(k, [n], interleaved=interleaved)[0])

    for m, n, shift in ((5, 2, 100), (0, 7, 33), (40, 40, 1000)):
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)
    np.testing.assert_allclose(np.linalg.norm(fa_lab.rope(q, [123])), np.linalg.norm(q))


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        fa_lab.rope(_rand(3, 5), np.arange(3))
    with pytest.raises(ValueError, match="broadcast"):
        fa_lab.rope(_rand(3, 4), np.arange(4))
    with pytest.raises(TypeError, match="positions"):
        fa_lab.rope(_rand(3, 4), np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match="float"):
        fa_lab.rope(np.ones((3, 4), int), np.arange(3))
    with pytest.raises(ValueError, match="base"):
        fa_lab.rope(_rand(3, 4), np.arange(3), base=0)


# ---------------------------------------------------------------- the tiny decoder

def test_cached_greedy_decoding_equals_recomputation():
    model = TinyLM(vocab=40, d_model=64, heads=4, kv_heads=2, layers=2, seed=3)
    prompt = np.random.default_rng(1).integers(0, 40, 11)
    a, la = model.generate(prompt, 12, use_cache=True)
    b, lb = model.generate(prompt, 12, use_cache=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(la, lb, atol=2e-4, rtol=1e-4)
    assert len(a) == 23
    with pytest.raises(ValueError, match="prompt"):
        model.generate([], 3)


def test_time_generation_and_decode_latency_run():
    df = time_generation(TinyLM(vocab=20, d_model=32, heads=2, kv_heads=1, layers=1), [4],
                         steps=3, repeats=1)
    assert df["max_logit_diff"].iloc[0] < 1e-3
    np.testing.assert_allclose(df["speedup"], df["recompute_ms_per_token"]
                               / df["cached_ms_per_token"])
    # the median ratio lies in its quartile range (up to rounding: ms per token vs seconds)
    slack = 1 + 1e-9
    assert ((df["speedup_low"] <= df["speedup"] * slack)
            & (df["speedup"] <= df["speedup_high"] * slack)).all()
    lat = decode_latency([64], H=2, H_kv=1, d=8, repeats=2)
    assert "fa_lab.decode" in set(lat["name"])
    assert (lat["d"] == 8).all() and lat["timing"].str.startswith("one process, back to back").all()


# ---------------------------------------------------------------- top-K retrieval

@pytest.mark.parametrize("Q,N,d,k,block", [(1, 1000, 16, 5, 64), (7, 333, 8, 1, 50),
                                           (3, 50, 4, 50, 7), (2, 4097, 32, 17, 4096)])
def test_topk_exact_against_argsort(Q, N, d, k, block):
    q, keys = _rand(Q, d), _rand(N, d, seed=1)
    idx, s = fa_lab.topk_attention(q, keys, k=k, block=block)
    ridx, rs = retrieval.topk_reference(q, keys, k)
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)


def test_topk_ties_go_to_the_smaller_index_and_values_are_weighted():
    keys = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0], [1, 0]], np.float64)
    vals = np.arange(10, dtype=np.float64).reshape(5, 2)
    idx, s, out = fa_lab.topk_attention(np.array([1.0, 0.0]), keys, vals, k=2, block=2)
    np.testing.assert_array_equal(idx, [0, 2])  # three keys tie at 1.0: 0 and 2 win
    np.testing.assert_allclose(s, [1, 1])
    np.testing.assert_allclose(out, vals[[0, 2]].mean(axis=0))


def test_topk_errors():
    q, keys = _rand(4), _rand(10, 4)
    with pytest.raises(ValueError, match="k must be in 1..N"):
        fa_lab.topk_attention(q, keys, k=11)
    with pytest.raises(TypeError, match="k must be an int"):
        fa_lab.topk_attention(q, keys, k=2.0)
    with pytest.raises(ValueError, match="d=4"):
        fa_lab.topk_attention(_rand(5), keys)
    with pytest.raises(TypeError, match="share a dtype"):
        fa_lab.topk_attention(q.astype(np.float64), keys)
    with pytest.raises(ValueError, match=r"values must have shape \(N=10"):
        fa_lab.topk_attention(q, keys, np.ones((9, 2)))
    bad = keys.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="keys must be finite"):
        fa_lab.topk_attention(q, bad)
    with pytest.raises(ValueError, match="block"):
        fa_lab.topk_attention(q, keys, block=0)


def test_topk_benchmark_runs_and_checks():
    df = bench.retrieval_benchmark([500], d=16, repeats=1, measure_memory=False)
    assert set(df["name"]) == {"fa_lab.topk_attention", "numpy argpartition"}


# ---------------------------------------------------------------- presets

def test_presets_untuned_say_so_and_tuned_come_from_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("FA_LAB_TUNE_FILE", str(tmp_path / "t.json"))
    tune.reset_cache()
    t = presets.table()
    assert list(t["preset"]) == list(presets.PRESETS)
    assert (t["source"] == "default, not tuned").all()
    tune.autotune("flash", ["decode", "long"], quick=True, repeats=1)
    t = presets.table().set_index("preset")
    assert t.loc["throughput", "source"].startswith("tuned")
    assert t.loc["memory", "peak_bytes_model"] <= t.loc["throughput", "peak_bytes_model"]
    assert t.loc["memory", "vs_fastest"] >= 1.0
    kw = presets.get("throughput")
    q = _rand(1, 2, 40, 8)
    out = fa_lab.attention(q, q, q, **kw)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="name must be one of"):
        presets.get("fastest")
    tune.reset_cache()
