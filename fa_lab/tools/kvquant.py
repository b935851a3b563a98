"""Quantized KV caches measured: bytes, accuracy, speed against each format's bandwidth
floor, and the targets against fa_lab's float32 cache and PyTorch (lesson 14).

* :func:`format_table`, :func:`model_cache_sizes`: bytes per token and a model's cache
  (counted, not timed);
* :func:`accuracy_table`: output cosine against float64 for each format on Gaussian K/V,
  on keys with per-channel offsets (``k + 3 z_c``) and on all-MiniLM-L6-v2's captured
  K/V; :func:`kivi_table`: keys only, values only, both (KIVI's asymmetry);
  :func:`greedy_divergence`: TinyLM's 32 greedy tokens per format;
* :func:`time_vs_context`: one decode step per format and context length, side by side in
  one process, next to its floor (bytes read / the read bandwidth measured at that
  working set, so the level that holds the cache sets it);
* :func:`targets`: the benchmark (``B=1, H=32, H_kv=8, d=128``, one query): each
  contender in its own process (:func:`fa_lab.tools.bench.isolated.time_isolated`), so
  none runs while another one's threads are busy; :func:`kvcache_call` is the factory
  its workers build their call from.
"""

from __future__ import annotations

import numpy as np

from fa_lab.features.decoding.tinylm import TinyLM
from fa_lab.features.kvcache import attention_with_kvcache
from fa_lab.features.minilm import load_captured
from fa_lab.numerics import reference
from fa_lab.numerics.kvquant import bytes_per_token, dequantize_kv, quantize_kv
from fa_lab.numerics.verdict import quartiles, ratio_range
from fa_lab.registry import KVCACHE_KERNELS
from fa_lab.tools import hierarchy
from fa_lab.tools.bench.contenders import torch_module
from fa_lab.tools.bench.harness import Contender, time_calls
from fa_lab.tools.bench.isolated import time_isolated

#: The formats the lesson compares: name -> quantize_kv's keywords (None: float32).
FORMATS = {"float32": None,
           "int8": {"bits": 8},
           "int4": {"bits": 4},
           "int4 g32": {"bits": 4, "group": 32},
           "int4 g32 smooth": {"bits": 4, "group": 32, "smooth_k": True}}

#: A Llama-3-8B-shaped cache: 32 layers, 8 kv heads of d = 128.
LLAMA3_8B = {"layers": 32, "kv_heads": 8, "d": 128}


def _fmt_args(fmt):
    kw = FORMATS[fmt]
    kv_dtype = "float32" if kw is None else f"int{kw['bits']}"
    return kv_dtype, (kw or {}).get("group")


def format_table(d=128, formats=None):
    """Bytes per token and kv head (K and V, with float32 scales) per format."""
    import pandas as pd

    rows = []
    for fmt in formats or FORMATS:
        kv_dtype, group = _fmt_args(fmt)
        b = bytes_per_token(d, kv_dtype=kv_dtype, group=group)
        rows.append({"format": fmt, "bytes_per_token_head": b,
                     "vs_float32": bytes_per_token(d) / b})
    return pd.DataFrame(rows)


def model_cache_sizes(contexts=(8192, 32768, 131072), config=None, formats=None):
    """GiB of K and V for one sequence of a model (default :data:`LLAMA3_8B`)."""
    import pandas as pd

    cfg = config or LLAMA3_8B
    rows = []
    for fmt in formats or FORMATS:
        kv_dtype, group = _fmt_args(fmt)
        per = bytes_per_token(cfg["d"], kv_dtype=kv_dtype, group=group)
        rows.append({"format": fmt, **{f"{n // 1024}k tokens (GiB)":
                                       cfg["layers"] * cfg["kv_heads"] * per * n / 2**30
                                       for n in contexts}})
    return pd.DataFrame(rows)


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def quantized_output(q, k, v, fmt, which="kv"):
    """``attention_with_kvcache`` of ``q`` against ``k``, ``v`` stored in ``fmt``
    (``which``: quantize keys and values, ``"k"`` only or ``"v"`` only; the other stays
    float32). Non-causal: every query sees every key."""
    kw = FORMATS[fmt]
    if kw is None:
        return attention_with_kvcache(q, k, v, cache_seqlens=k.shape[2], causal=False,
                                      kernel="quantized")
    parts = quantize_kv(k, v, **kw)
    kd, vd = dequantize_kv(parts[0], parts[1]), dequantize_kv(parts[2], parts[3])
    if which == "kv":
        extra = {"k_mean": parts[4]} if len(parts) == 5 else {}
        return attention_with_kvcache(q, parts[0], parts[2], cache_seqlens=k.shape[2],
                                      causal=False, k_scale=parts[1], v_scale=parts[3],
                                      **extra)
    if which == "k":  # smoothing shifts every score of a row alike: the output ignores it
        return attention_with_kvcache(q, kd, v, cache_seqlens=k.shape[2], causal=False,
                                      kernel="quantized")
    return attention_with_kvcache(q, k, vd, cache_seqlens=k.shape[2], causal=False,
                                  kernel="quantized")


def datasets(seed=0, N=1024, H=8, H_kv=2, d=128, Nq=16, minilm=True):
    """``{name: [(q, k, v), ...]}``: Gaussian, keys with per-channel offsets, MiniLM."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, H, Nq, d)).astype(np.float32)
    k = rng.standard_normal((1, H_kv, N, d)).astype(np.float32)
    v = rng.standard_normal((1, H_kv, N, d)).astype(np.float32)
    z = rng.standard_normal(d).astype(np.float32)
    out = {"Gaussian": [(q, k, v)], "k + 3 z_c": [(q, k + 3 * z, v)]}
    if minilm:
        cap = load_captured()
        out["MiniLM K/V"] = [(cap["q"][s][layer][None], cap["k"][s][layer][None],
                              cap["v"][s][layer][None])
                             for s in range(len(cap["q"])) for layer in range(len(cap["q"][s]))]
    return out


def accuracy_table(formats=None, which="kv", data=None, **kw):
    """Output cosine against float64 per (data, format): the worst over the data's
    cases (MiniLM: every sentence and layer)."""
    import pandas as pd

    data = data or datasets(**kw)
    rows = []
    for name, cases in data.items():
        refs = [reference.attention(*(x.astype(np.float64) for x in c))[0] for c in cases]
        for fmt in formats or FORMATS:
            cos = [_cosine(quantized_output(*c, fmt, which), r) for c, r in zip(cases, refs)]
            rows.append({"data": name, "format": fmt, "quantized": which,
                         "cosine": min(cos), "cases": len(cases)})
    return pd.DataFrame(rows)


def kivi_table(fmt="int4", **kw):
    """KIVI's asymmetry, measured: the output cosine with only keys, only values, or both
    quantized (``fmt``), per dataset."""
    import pandas as pd

    data = datasets(**kw)
    return pd.concat([accuracy_table([fmt], which, data) for which in ("k", "v", "kv")],
                     ignore_index=True)


def greedy_divergence(steps=32, formats=None, prompt=(3, 14, 15, 92, 65, 35, 89, 79)):
    """TinyLM's greedy tokens with each cache format: how many generated tokens equal the
    float32 cache's, and the first step (1-based) that differs (``"none"``)."""
    import pandas as pd

    model = TinyLM()
    base, _ = model.generate(list(prompt), steps)
    rows = []
    for fmt in formats or FORMATS:
        kw = FORMATS[fmt]
        fmt_kw = {} if kw is None else {"kv_dtype": f"int{kw['bits']}", "group": kw.get("group"),
                                         "smooth_k": kw.get("smooth_k", False)}
        tokens, _ = model.generate(list(prompt), steps, **fmt_kw)
        diff = np.nonzero(tokens != base)[0]
        same = int(diff[0] - len(prompt)) if len(diff) else steps
        rows.append({"format": fmt, "same_tokens": same,  # then the first different one
                     "first_different_step": same + 1 if same < steps else "none"})
    return pd.DataFrame(rows)


def _cache(fmt, B, H_kv, Nk, d, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, H_kv, Nk, d)).astype(np.float32)
    v = rng.standard_normal((B, H_kv, Nk, d)).astype(np.float32)
    kw = FORMATS.get(fmt)
    if kw is None:
        return k, v, {}
    parts = quantize_kv(k, v, **kw)
    extra = {"k_scale": parts[1], "v_scale": parts[3]}
    if len(parts) == 5:
        extra["k_mean"] = parts[4]
    return parts[0], parts[2], extra


def cache_bytes(fmt, B, H_kv, Nk, d) -> int:
    kv_dtype, group = _fmt_args(fmt)
    return B * H_kv * Nk * bytes_per_token(d, kv_dtype=kv_dtype, group=group)


def kvcache_call(fmt="int8", B=1, H=32, H_kv=8, Nk=32768, d=128, kernel="quantized", seed=0):
    """A checked, ready-to-time decode step (one query per head) against a cache in
    ``fmt`` (a key of :data:`FORMATS`, or ``"torch_sdpa"``: PyTorch's SDPA in float32 on
    the float32 cache, ``enable_gqa``). ``kernel``: the float32 cache's kernel
    (``"quantized"`` or ``"flash"``). Returns ``fn()``."""
    q = np.random.default_rng(seed + 1).standard_normal((B, H, 1, d)).astype(np.float32)
    if fmt == "torch_sdpa":
        torch = torch_module()
        if torch is None:
            raise RuntimeError("torch is not installed")
        k, v, _ = _cache("float32", B, H_kv, Nk, d, seed)
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def fn():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, enable_gqa=H != H_kv).numpy()
        ref = attention_with_kvcache(q, k, v, cache_seqlens=Nk, kernel="quantized")
    else:
        k, v, extra = _cache(fmt, B, H_kv, Nk, d, seed)
        kern = kernel if fmt == "float32" or kernel == "quantized_vnni" else "quantized"

        def fn():
            return attention_with_kvcache(q, k, v, cache_seqlens=Nk, kernel=kern, **extra)
        ref = attention_with_kvcache(q, k, v, cache_seqlens=Nk, kernel="reference", **extra)
    if kernel == "quantized_vnni":  # int8 queries: not exact, judged by cosine
        if not _cosine(fn(), ref) >= 0.9999:
            raise AssertionError(f"{fmt} ({kernel}): cosine {_cosine(fn(), ref):.6f} < 0.9999")
        return fn
    err = float(np.abs(fn() - ref).max())
    if not err < 1e-4:
        raise AssertionError(f"{fmt}: {err:.3g} from the reference of its own cache")
    return fn


def _row(name, times, nbytes, gbps, load):
    q25, med, q75 = quartiles(times)
    return {"contender": name, "median_ms": 1e3 * med, "q25_ms": 1e3 * q25,
            "q75_ms": 1e3 * q75, "bytes": nbytes,
            "floor_ms": 1e3 * nbytes / (gbps * 1e9) if gbps else np.nan, **load.columns()}


def read_bandwidth(nbytes_list, threads=None, repeats=3):
    """GB/s of the read stream at each working set (all threads): the bandwidth of the
    level that holds a cache of that size."""
    sweep = hierarchy.bandwidth_sweep(sorted(set(int(n) for n in nbytes_list)),
                                      kinds=("read",), threads=threads, repeats=repeats)
    top = sweep["threads"].max()
    sel = sweep[sweep["threads"] == top]
    return dict(zip(sel["ws_bytes"], sel["gbps"]))


def time_vs_context(contexts=(2048, 8192, 32768), formats=("float32", "int8", "int4 g32"),
                    B=1, H=32, H_kv=8, d=128, repeats=7):
    """One decode step per (format, context), the formats side by side in one process
    (:func:`fa_lab.tools.bench.harness.time_calls`), with each format's floor."""
    import pandas as pd

    rows = []
    for Nk in contexts:
        calls = {fmt: kvcache_call(fmt, B, H, H_kv, Nk, d) for fmt in formats}
        sizes = {fmt: cache_bytes(fmt, B, H_kv, Nk, d) for fmt in formats}
        bw = read_bandwidth(sizes.values())
        times = time_calls([Contender(f, calls[f], "kernel") for f in formats], (),
                           repeats=repeats, warmup=2)
        for fmt in formats:
            r = _row(fmt, times[fmt], sizes[fmt], bw[sizes[fmt]], times.load)
            rows.append({"Nk": Nk, "format": fmt, **r, "gbps_read": bw[sizes[fmt]],
                         "vs_floor": r["median_ms"] / r["floor_ms"]})
    return pd.DataFrame(rows)


def targets(B=1, H=32, H_kv=8, Nk=32768, d=128, rounds=5, calls=3, torch=True, vnni=None):
    """The benchmark: ``float32`` (the quantized kernel and ``flash``), ``int8`` (and
    ``int8 vnni``, the int8-query variant, where the CPU has VNNI and ``vnni`` is not
    False), ``int4 g32`` and PyTorch's SDPA (float32, same data), each in its own
    process, alternating rounds; floors from the read bandwidth at each cache's size. Ratios are speeds
    against ``float32`` (the same kernel reading float32) and against ``torch_sdpa``,
    with quartile ranges (:func:`fa_lab.numerics.verdict.ratio_range`)."""
    import pandas as pd

    factory = "fa_lab.tools.kvquant:kvcache_call"
    shape = dict(B=B, H=H, H_kv=H_kv, Nk=Nk, d=d)
    specs = {"float32": (factory, {"fmt": "float32", **shape}),
             "float32 flash": (factory, {"fmt": "float32", "kernel": "flash", **shape}),
             "int8": (factory, {"fmt": "int8", **shape}),
             "int4 g32": (factory, {"fmt": "int4 g32", **shape})}
    if vnni is not False and KVCACHE_KERNELS["quantized_vnni"].available() is None \
            and d % 64 == 0:
        specs["int8 vnni"] = (factory, {"fmt": "int8", "kernel": "quantized_vnni", **shape})
    if torch and torch_module() is not None:
        specs["torch_sdpa"] = (factory, {"fmt": "torch_sdpa", **shape})
    times = time_isolated(specs, rounds=rounds, calls=calls)
    fmts = {"float32": "float32", "float32 flash": "float32", "int8": "int8",
            "int8 vnni": "int8", "int4 g32": "int4 g32", "torch_sdpa": "float32"}
    sizes = {name: cache_bytes(fmts[name], B, H_kv, Nk, d) for name in specs}
    bw = read_bandwidth(sizes.values())
    rows = []
    for name in specs:
        r = _row(name, times[name], sizes[name], bw[sizes[name]], times.load)
        r["vs_floor"] = r["median_ms"] / r["floor_ms"]
        for base in ("float32", "torch_sdpa"):
            if base in specs:
                low, mid, high = ratio_range(times[base], times[name])
                r[f"speed_vs_{base}"], r[f"vs_{base}_low"], r[f"vs_{base}_high"] = mid, low, high
        rows.append(r)
    return pd.DataFrame(rows)


__all__ = ["FORMATS", "LLAMA3_8B", "format_table", "model_cache_sizes", "accuracy_table",
           "kivi_table", "greedy_divergence", "kvcache_call", "time_vs_context", "targets",
           "read_bandwidth", "cache_bytes", "datasets", "quantized_output"]
