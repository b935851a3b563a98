"""The INT8 accuracy and speed study behind lesson 04 (data sets, metrics, tables; the
figures are in :mod:`fa_lab.viz`).

Data sets (``(B, H, N, d)`` float32, one seed each):

* ``gaussian``: i.i.d. standard normal Q, K, V;
* ``k_offset``: K with a shared per-channel offset (``K += 4 * z_c``, ``z ~ N(0, 1)`` per
  channel, the same for every token), as real LLM keys have;
* ``q_outliers``: Q with a few outlier channels (4 of d channels scaled by 15);
* real activations: Q, K, V of every layer and head of all-MiniLM-L6-v2
  (:func:`fa_lab.features.minilm.load_captured`).

Metrics of an output against the float64 reference: cosine similarity, relative L1
(``sum|o - r| / sum|r|``), RMSE and the largest absolute error.
"""

from __future__ import annotations

import numpy as np

import statistics

import pandas as pd

from fa_lab.tools import bench
from fa_lab.numerics import reference
from fa_lab.api import attention, prepare
from fa_lab.features.int8 import attention_int8, quantize_inputs
from fa_lab.kernels.probes import tiles as probes
from fa_lab.features.minilm import load_captured
from fa_lab.numerics.buffers import aligned
from fa_lab.numerics.quant import GRANULARITIES, quantize
from fa_lab.registry import INT8_KERNELS

DATASETS = ("gaussian", "k_offset", "q_outliers")
#: Offset scale of ``k_offset`` and the outliers of ``q_outliers``.
K_OFFSET = 4.0
Q_OUTLIER_CHANNELS, Q_OUTLIER_SCALE = 4, 15.0


def synthetic(name, B=1, H=4, N=512, d=64, seed=0):
    """Q, K, V of one synthetic data set (see the module docstring)."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
    if name == "k_offset":
        k += (K_OFFSET * rng.standard_normal(d)).astype(np.float32)
    elif name == "q_outliers":
        ch = rng.choice(d, Q_OUTLIER_CHANNELS, replace=False)
        q[..., ch] *= Q_OUTLIER_SCALE
    return q, k, v


def metrics(out, ref) -> dict:
    """Cosine similarity, relative L1, RMSE and max error of ``out`` against ``ref``."""
    o = np.asarray(out, np.float64).ravel()
    r = np.asarray(ref, np.float64).ravel()
    diff = o - r
    return {"cosine": float(o @ r / (np.linalg.norm(o) * np.linalg.norm(r))),
            "rel_l1": float(np.abs(diff).sum() / np.abs(r).sum()),
            "rmse": float(np.sqrt(np.mean(diff ** 2))), "max_error": float(np.abs(diff).max())}


def _variants():
    return [(g, s) for g in GRANULARITIES for s in (False, True)]


def accuracy_table(datasets=DATASETS, *, N=512, H=4, d=64, causal=False, kernel="simd",
                   seed=0):
    """One row per (data set, granularity, smoothing) with the four metrics, plus the
    float32 ``flash`` kernel as a baseline row per data set ("fp32")."""
    rows = []
    for name in datasets:
        q, k, v = synthetic(name, H=H, N=N, d=d, seed=seed)
        ref, _ = reference.attention(q, k, v, causal=causal)
        rows.append({"data": name, "variant": "fp32 (flash)", "granularity": "-",
                     "smooth_k": "-", **metrics(attention(q, k, v, causal=causal), ref)})
        for g, s in _variants():
            out = attention_int8(q, k, v, causal=causal, granularity=g, smooth_k=s,
                                 kernel=kernel)
            rows.append({"data": name, "variant": f"int8 {g}{' + smooth K' if s else ''}",
                         "granularity": g, "smooth_k": s, **metrics(out, ref)})
    return pd.DataFrame(rows)


def real_accuracy(captured=None, *, kernel="simd"):
    """Per layer of all-MiniLM-L6-v2: metrics of every INT8 variant (all heads and both
    sentences of the capture together) against the float64 reference."""
    cap = captured or load_captured()
    rows = []
    layers = cap["q"][0].shape[0]
    for layer in range(layers):
        qs = [q[layer] for q in cap["q"]]
        ks = [k[layer] for k in cap["k"]]
        vs = [v[layer] for v in cap["v"]]
        refs = [reference.attention(q, k, v)[0] for q, k, v in zip(qs, ks, vs)]
        offset = float(np.mean([np.abs(k.mean(axis=-2)).mean() / k.std(axis=-2).mean()
                                for k in ks]))
        for g, s in _variants():
            outs = [attention_int8(q, k, v, granularity=g, smooth_k=s, kernel=kernel)
                    for q, k, v in zip(qs, ks, vs)]
            m = metrics(np.concatenate([o.ravel() for o in outs]),
                        np.concatenate([r.ravel() for r in refs]))
            rows.append({"layer": layer, "variant": f"int8 {g}{' + smooth K' if s else ''}",
                         "granularity": g, "smooth_k": s, "k_offset_ratio": offset, **m})
    return pd.DataFrame(rows)


def error_vs_length(Ns, *, data="k_offset", H=2, d=64, kernel="simd", seed=0):
    """Relative L1 and cosine of each variant against N (one data set)."""
    rows = []
    for N in Ns:
        q, k, v = synthetic(data, H=H, N=N, d=d, seed=seed)
        ref, _ = reference.attention(q, k, v)
        for g, s in _variants():
            m = metrics(attention_int8(q, k, v, granularity=g, smooth_k=s, kernel=kernel), ref)
            rows.append({"N": N, "variant": f"int8 {g}{' + smooth K' if s else ''}", **m})
    return pd.DataFrame(rows)


def key_bytes(B, H_kv, N, d, granularity="per_block", block=64) -> dict:
    """Bytes to store K: float32 vs int8 plus its float32 scales."""
    scales = {"per_tensor": 1, "per_token": B * H_kv * N,
              "per_block": B * H_kv * -(-N // block)}[granularity]
    return {"fp32": 4 * B * H_kv * N * d, "int8": B * H_kv * N * d, "scales": 4 * scales,
            "ratio": (B * H_kv * N * d + 4 * scales) / (4 * B * H_kv * N * d)}


def loop_speed(N=1024, H=8, d=64, *, repeats=5, block=64, seed=0):
    """Side by side, one run: (1) QK^T alone, int8 vs the fp32 loop of ``tiled_simd``
    (one thread, every ``block x block`` tile of one head); (2) whole attention:
    ``int8 simd`` (quantization included, and without it) vs ``tiled_simd`` (fp32, same
    structure) vs ``flash`` (fastest fp32). Each attention contender is validated
    against its own reference first. Returns two DataFrames."""
    q, k, v = synthetic("gaussian", H=H, N=N, d=d, seed=seed)
    q0, k0 = q[0, 0], k[0, 0]
    q8, kq8 = (aligned(quantize(x, "per_token")[0]) for x in (q0, k0))
    q0, k0 = aligned(q0), aligned(k0)
    probes.qk_all_blocks_i8(q8, kq8, block, block)
    probes.qk_all_blocks_f32(q0, k0, block, block)
    qk = [bench.Contender("QK^T int8 (int32 accumulate)", lambda: probes.qk_all_blocks_i8(
              q8, kq8, block, block), "kernel"),
          bench.Contender("QK^T fp32 (tiled_simd loop)", lambda: probes.qk_all_blocks_f32(
              q0, k0, block, block), "kernel")]
    # Back to back and more rounds: two single-threaded Numba loops of a few ms, no BLAS
    # thread pools involved; a pause before each call made both read up to 1.6x slower.
    t = bench.time_calls(qk, (), repeats=max(15, 3 * repeats), warmup=2, cooldown=0)
    ops = 2.0 * (N // block * block) ** 2 * d
    qk_df = pd.DataFrame([{"contender": c.name, "name": c.name,
                           "median_ms": statistics.median(t[c.name]) * 1e3,
                           "gops": ops / statistics.median(t[c.name]) / 1e9, **t.summary(c.name)}
                          for c in qk])
    qk_df["speedup_vs_fp32_loop"] = qk_df["median_ms"].iloc[1] / qk_df["median_ms"]

    call = prepare(q, k, v)
    pre = quantize_inputs(call.q4, call.k4, "per_block", block, block, True)
    cs = [bench.Contender("int8 simd (with quantization)", lambda q, k, v: attention_int8(
              q, k, v, kernel="simd", block_q=block, block_kv=block), "kernel"),
          bench.Contender("int8 simd (pre-quantized)", lambda q, k, v: call.run(
              "simd", table=INT8_KERNELS, arrays=(*pre[:4], call.v4), block_q=block,
              block_kv=block)[0], "kernel"),
          bench.Contender("tiled_simd (fp32)", lambda q, k, v: attention(
              q, k, v, kernel="tiled_simd", block_q=block, block_kv=block), "kernel"),
          bench.Contender("flash (fp32)", lambda q, k, v: attention(q, k, v, kernel="flash"),
                          "kernel")]
    ref_int = call.run("reference", table=INT8_KERNELS, arrays=(*pre[:4], call.v4))[0]
    for c in cs[:2]:
        np.testing.assert_allclose(c.fn(q, k, v), ref_int, atol=1e-5, rtol=1e-4)
    for c in cs[2:]:
        bench.validate(c, q, k, v)
    times = bench.time_calls(cs, (q, k, v), repeats=repeats, warmup=0)
    f = bench.flops(1, H, N, N, d)
    att = pd.DataFrame([{"contender": c.name, "name": c.name,
                         "median_ms": statistics.median(times[c.name]) * 1e3,
                         **times.summary(c.name, f)} for c in cs])
    att["speed_vs_tiled_simd"] = att["median_ms"].iloc[2] / att["median_ms"]
    return qk_df, att
