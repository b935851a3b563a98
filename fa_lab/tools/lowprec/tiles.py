"""One head, one thread, the same tiles: the micro-kernels of ``sage``
against the BLAS path of ``flash`` (lesson 10; part of ``python -m fa_lab bench --sweep
int8``), on the tile loops of :mod:`fa_lab.kernels.probes.tiles`. Operations are counted as in ``flops``: a multiply and an add are 2."""

from __future__ import annotations

import numpy as np

from fa_lab.features.int8 import quantize_inputs
from fa_lab.kernels.probes import tiles as probes
from fa_lab.numerics import verdict
from fa_lab.settings import config, cpu_features
from fa_lab.tools.bench.harness import Contender, time_calls

#: The target for the score micro-kernel against fp32 BLAS on the same tiles.
TARGET_TILES = 2.5


def score_tiles(N=2048, d=64, *, block_q=None, block_kv=None, repeats=5, seed=0):
    """One head, one thread: every ``Qi Kj^T`` block by the INT8 score micro-kernel, by
    fp32 BLAS (``np.dot`` on the same tiles, as ``flash``) and by the plain-loop int8
    kernel (``vpmaddwd`` from loops). Returns ``(table, verdict)`` with G op/s
    (``2 N^2 d``) and the target "micro-kernel >= 2.5x fp32 matmul" judged."""
    import pandas as pd

    f = cpu_features.detect()
    if f.score_path is None:
        raise NotImplementedError("score_tiles needs AVX-512 (no micro-kernel on this CPU)")
    bq, bk = block_q or config.SAGE_BLOCKS[0], block_kv or config.SAGE_BLOCKS[1]
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((1, 1, N, d)).astype(np.float32) for _ in range(2))
    q8, sq, k8, sk, _ = quantize_inputs(q, k, "per_block", bq, bk, True)
    Qx, rs, Kp, corr, skp, steps = probes.score_tile_operands(q8, sq, k8, sk, bq, bk,
                                                               f.score_path)
    q2, k2 = q[0, 0].copy(), k[0, 0].copy()
    bench_name = f"int8 micro-kernel ({'vpdpbusd' if f.score_path == 'vnni' else 'vpmaddwd'})"
    cs = [Contender(bench_name, lambda: probes.qk_blocks_microkernel(
              Qx, rs, Kp, corr, skp, N, d, bq, steps), "kernel"),
          Contender("fp32 BLAS (np.dot tiles)", lambda: probes.qk_blocks_blas(
              q2, k2, bq, bk), "baseline"),
          Contender("int8 plain loops (simd)", lambda: probes.qk_all_blocks_i8(
              q8[0, 0], k8[0, 0], bq, bk), "kernel")]
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    ops = 2.0 * (N // bq * bq) * (N // bk * bk) * d
    table = pd.DataFrame([{"name": c.name, "tiles": f"{bq}x{bk}", **times.summary(c.name, ops)}
                          for c in cs]).rename(columns={"gflops": "gops"})
    low, mid, high = times.ratio(cs[1].name, cs[0].name)
    v = verdict.judge("INT8 score micro-kernel vs fp32 BLAS on the same tiles (op/s ratio)",
                      mid, TARGET_TILES, low=low, high=high, load=times.load)
    return table, v


def pv_tiles(N=2048, d=64, *, block_q=None, block_kv=None, repeats=5, seed=0):
    """The fp32 FMA micro-kernel (``P V``, what ``sage`` runs with ``pv_dtype="float32"``
    or without AVX512-BF16) against fp32 BLAS (``np.dot`` of each contiguous probability
    tile, then added, as ``flash``): every block of one head, one thread. Returns
    ``(table, verdict)`` with GFLOP/s (``2 N^2 d``) and "does it pay" (at least BLAS's
    throughput) judged."""
    import pandas as pd

    if cpu_features.detect().score_path is None:
        raise NotImplementedError("pv_tiles needs AVX-512 (no micro-kernel on this CPU)")
    bq, bk = block_q or config.SAGE_BLOCKS[0], block_kv or config.SAGE_BLOCKS[1]
    Tr, Tc = N // bq, N // bk
    Pt, V = probes.pv_tile_operands(Tr, Tc, bq, bk, d, np.random.default_rng(seed))
    cs = [Contender("fp32 FMA micro-kernel (P V)", lambda: probes.pv_blocks_microkernel(
              Pt, V), "kernel"),
          Contender("fp32 BLAS (np.dot tiles, P V)", lambda: probes.pv_blocks_blas(Pt, V),
                    "baseline")]
    a, b = (c.fn() for c in cs)
    if not abs(a - b) <= 1e-3 * max(1.0, abs(b)):
        raise AssertionError(f"P V micro-kernel checksum {a} != BLAS {b}: not timed")
    times = time_calls(cs, (), repeats=repeats, warmup=1)
    ops = 2.0 * (Tr * bq) * (Tc * bk) * d
    table = pd.DataFrame([{"name": c.name, "tiles": f"{bq}x{bk}", **times.summary(c.name, ops)}
                          for c in cs])
    low, mid, high = times.ratio(cs[1].name, cs[0].name)
    v = verdict.judge("fp32 P V micro-kernel vs fp32 BLAS on the same tiles (does it pay?)",
                      mid, 1.0, low=low, high=high, load=times.load)
    return table, v
