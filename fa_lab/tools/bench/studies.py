"""Studies: where ``flash``'s time goes, the backward against the forward, decoding
(one step against a long cache, whole generation) and top-K retrieval. Each validates
what it times and times it with the one harness (:func:`fa_lab.tools.bench.harness.time_calls`).
"""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd

from fa_lab.tools import memory
from fa_lab.numerics import reference
from fa_lab.api import attention, prepare
from fa_lab.features.backward import attention_backward
from fa_lab.tools.bench.contenders import torch_module
from fa_lab.tools.bench.harness import (TIMING_APART, Contender, flops, time_apart, time_calls,
                                        validate)
from fa_lab.features.decoding import KVCache, TinyLM, decode
from fa_lab.registry import KERNELS
from fa_lab.features.retrieval import numpy_topk, topk_attention
from fa_lab.numerics.testing import Case, assert_close
from fa_lab.numerics.verdict import quartiles


#: The four parts of :func:`breakdown`, in the order the kernel runs them.
BREAKDOWN_PARTS = ("loop, Q scaling, epilogue", "S = Q K^T (BLAS)", "softmax (max, exp, sum)",
                   "P V (BLAS) + rescale")


def breakdown(case: Case, *, causal=False, dtype=np.float32, repeats=5, block_q=None,
              block_kv=None, seed=0):
    """Where the ``flash`` kernel's time goes: the same driver stopped after each stage.

    Stage 0 runs only the loops (plus Q scaling and the epilogue), stage 1 adds
    ``S = Qi Kj^T``, stage 2 the softmax, stage 3 ``P Vj`` and the rescale (the whole
    kernel, validated first). Part times are differences of interleaved medians, so
    they carry the noise of two measurements (a small negative part means "lost in
    the noise"). Returns one row per part with ms and the share of the total.
    """
    q, k, v = case.inputs(dtype=dtype, seed=seed)
    validate(Contender("flash", lambda q, k, v: attention(
        q, k, v, causal=causal, kernel="flash", block_q=block_q, block_kv=block_kv), "kernel"),
        q, k, v, causal)
    call = prepare(q, k, v, causal=causal, block_q=block_q, block_kv=block_kv)
    bq, bk, _ = call.blocks("flash", KERNELS["flash"])
    cs = [Contender(f"stage{s}", lambda q, k, v, _s=s: call.run(
        "flash", splits=1, stage=_s), "kernel") for s in range(4)]
    # Back to back (no cooldown): only fa_lab's own threads run here, and a pause would
    # put them to sleep, adding their wake-up (ms on this VM) to the short stages.
    times = time_calls(cs, (q, k, v), repeats=repeats, warmup=1, cooldown=0)
    med = [statistics.median(times[f"stage{s}"]) for s in range(4)]
    parts = [med[0], med[1] - med[0], med[2] - med[1], med[3] - med[2]]
    nk = case.Nk if case.Nk is not None else case.Nq
    f = flops(case.B, case.H, case.Nq, nk, case.d, causal)
    return pd.DataFrame([{"part": name, "ms": p * 1e3, "share": p / med[3],
                          "B": case.B, "H": case.H, "Nq": case.Nq, "Nk": nk, "d": case.d,
                          "causal": causal, "block_q": bq, "block_kv": bk,
                          "total_ms": med[3] * 1e3, "total_gflops": f / med[3] / 1e9,
                          **times.load.columns()}
                         for name, p in zip(BREAKDOWN_PARTS, parts)])


def backward_vs_forward(cases, *, forward="tiled_simd", backward="tiled", causal=False,
                        dtype=np.float32, repeats=5, seed=0):
    """Time a forward kernel and a backward kernel side by side (validated first).

    Returns one row per case: medians, the measured time ratio, and the FLOP ratio of
    the backward as implemented (7 block products for ``tiled``: 3.5x the forward's 2)
    next to FlashAttention-2's 2.5x (5 products).
    """
    rows = []
    for case in cases:
        q, k, v = case.inputs(dtype=dtype, seed=seed)
        dout = np.random.default_rng(seed + 1).standard_normal(q.shape).astype(dtype)
        out, lse = attention(q, k, v, causal=causal, kernel=forward, return_lse=True)
        exp = reference.attention_backward(q, k, v, dout, causal=causal)
        base = reference.attention_backward(q, k, v, dout, causal=causal,
                                            dtype=np.dtype(dtype).type)
        grads = attention_backward(q, k, v, out, lse, dout, causal=causal, kernel=backward)
        errors = {}
        for name, g, e, b in zip(("dq", "dk", "dv"), grads, exp, base):
            errors[name] = assert_close(g, e, baseline=b, rule="float32_grad",
                                        what=f"{backward} {name}")
        cs = [Contender("forward", lambda q, k, v: attention(
                  q, k, v, causal=causal, kernel=forward, return_lse=True), "kernel"),
              Contender("backward", lambda q, k, v: attention_backward(
                  q, k, v, out, lse, dout, causal=causal, kernel=backward), "kernel")]
        times = time_calls(cs, (q, k, v), repeats=repeats, warmup=0)
        fwd, bwd = (statistics.median(times[c.name]) for c in cs)
        low, _, high = times.ratio("backward", "forward")
        nk = case.Nk if case.Nk is not None else case.Nq
        f = flops(case.B, case.H, case.Nq, nk, case.d, causal)
        rows.append({"B": case.B, "H": case.H, "N": case.Nq, "d": case.d, "causal": causal,
                     "forward_kernel": forward, "backward_kernel": backward,
                     "forward_ms": fwd * 1e3, "backward_ms": bwd * 1e3, "ratio": bwd / fwd,
                     "ratio_low": low, "ratio_high": high, **times.load.columns(),
                     "flop_ratio_as_implemented": 3.5, "flop_ratio_fa2": 2.5,
                     "forward_gflops": f / fwd / 1e9, "backward_gflops": 3.5 * f / bwd / 1e9,
                     **{f"{n}_max_error": e["max_error"] for n, e in errors.items()},
                     **{f"{n}_allowed": e["allowed"] for n, e in errors.items()}})
    return pd.DataFrame(rows)


def time_generation(model: TinyLM, prompt_lengths, steps=16, repeats=3, seed=0):
    """Seconds per generated token, cached vs recomputed, for several prompt lengths
    (both validated to produce the same tokens first; timed by the benchmark harness,
    interleaved, with the machine's load). Returns a DataFrame."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in prompt_lengths:
        prompt = rng.integers(0, model.vocab, n)
        a, la = model.generate(prompt, steps, use_cache=True)
        b, lb = model.generate(prompt, steps, use_cache=False)
        if not np.array_equal(a, b):
            raise AssertionError(f"cached and recomputed decoding differ at prompt length {n}")
        cs = [Contender(label, lambda c=cached: model.generate(prompt, steps, use_cache=c),
                        "kernel") for label, cached in (("cached", True), ("recompute", False))]
        t = time_calls(cs, (), repeats=repeats, warmup=0)  # the harness: cooldown, load
        (c25, c50, c75), (r25, r50, r75) = (quartiles(t[c.name]) for c in cs)
        rows.append({"prompt_len": n, "steps": steps,
                     "cached_ms_per_token": c50 / steps * 1e3,
                     "recompute_ms_per_token": r50 / steps * 1e3,
                     "speedup_low": r25 / c75, "speedup_high": r75 / c25,
                     "cached_q25_ms": c25 / steps * 1e3, "cached_q75_ms": c75 / steps * 1e3,
                     "recompute_q25_ms": r25 / steps * 1e3, "recompute_q75_ms": r75 / steps * 1e3,
                     "distinct_tokens": len(set(a[n:].tolist())),
                     "max_logit_diff": float(np.abs(la - lb).max()), **t.load.columns()})
    df = pd.DataFrame(rows)
    df["speedup"] = df["recompute_ms_per_token"] / df["cached_ms_per_token"]
    return df


def decode_latency(context_lengths, *, H=8, H_kv=8, d=64, repeats=30, seed=0):
    """Median latency of one :func:`fa_lab.decode` step (one new token) against caches of
    several lengths, with torch SDPA on the same keys beside it when installed (the
    benchmark harness, back-to-back calls, torch in its own rounds, with the machine's
    load per row)."""
    rng = np.random.default_rng(seed)
    torch = torch_module()
    rows = []
    for L in context_lengths:
        cache = KVCache(1, H_kv, L, d)
        cache.append(rng.standard_normal((1, H_kv, L, d)).astype(np.float32),
                     rng.standard_normal((1, H_kv, L, d)).astype(np.float32))
        q = rng.standard_normal((1, H, 1, d)).astype(np.float32)
        expected, _ = reference.attention(q, cache.keys, cache.values, causal="bottom_right")
        np.testing.assert_allclose(decode(q, cache), expected, atol=1e-5, rtol=1e-4)
        fns = {"fa_lab.decode": lambda: decode(q, cache)}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(np.array(x)) for x in (q, cache.keys, cache.values))
            fns["torch_sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, enable_gqa=H != H_kv)
        cs = [Contender(n, f, "kernel") for n, f in fns.items()]
        # Back to back, as in a decoding loop (a pause would add the threads' wake-up);
        # torch in its own rounds (its spinning threads would slow fa_lab's next call).
        times = time_apart(cs, (), repeats=repeats, warmup=1, cooldown=0)
        for c in cs:
            rows.append({"context": L, "name": c.name, "H": H, "H_kv": H_kv, "d": d,
                         **times.ms(c.name), "timing": TIMING_APART})
    return pd.DataFrame(rows)


def retrieval_benchmark(corpus_sizes, *, d=384, queries=1, k=10, block=8192, repeats=3, seed=0,
              measure_memory=True):
    """Time and peak memory of :func:`fa_lab.features.retrieval.topk_attention` vs
    :func:`fa_lab.features.retrieval.numpy_topk` per corpus
    size (unit-norm random float32 embeddings); results checked equal first, then timed
    by the benchmark harness (interleaved, with the machine's load per row)."""
    rng = np.random.default_rng(seed)
    rows = []
    for N in corpus_sizes:
        keys = rng.standard_normal((N, d), dtype=np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        q = rng.standard_normal((queries, d), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        mine = topk_attention(q, keys, k=k, block=block)
        base = numpy_topk(q, keys, k)
        if not np.array_equal(np.sort(mine[0], axis=1), np.sort(base[0], axis=1)):
            raise AssertionError(f"top-{k} sets differ at N={N}")
        fns = {"fa_lab.topk_attention": lambda: topk_attention(q, keys, k=k, block=block),
               "numpy argpartition": lambda: numpy_topk(q, keys, k)}
        cs = [Contender(n, f, "kernel") for n, f in fns.items()]
        times = time_calls(cs, (), repeats=repeats, warmup=0)
        for c in cs:
            peak = memory.measure(c.fn).peak_bytes if measure_memory else float("nan")
            rows.append({"N": N, "d": d, "queries": queries, "k": k, "name": c.name,
                         "peak_bytes": peak, "corpus_bytes": keys.nbytes, **times.ms(c.name)})
    return pd.DataFrame(rows)

