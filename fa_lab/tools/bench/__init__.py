"""Benchmarks (a tool, above the features; ``docs/ARCHITECTURE.md``), one module per concern:

* :mod:`~fa_lab.tools.bench.harness`: the one timing harness (interleaved rounds, cooldowns,
  the machine's load per window) and validation against the reference;
* :mod:`~fa_lab.tools.bench.contenders`: registry kernels and the NumPy / torch baselines;
* :mod:`~fa_lab.tools.bench.sweeps`: kernels x shapes, tiles, threads, key splits, the matmul peak;
* :mod:`~fa_lab.tools.bench.studies`: flash's time breakdown, backward vs forward, decoding,
  generation, retrieval;
* :mod:`~fa_lab.tools.bench.claims`: speed ratios, published claims and targets, judged by
  :mod:`fa_lab.numerics.verdict`.

Their public names are re-exported here (``fa_lab.tools.bench.run``, ``fa_lab.tools.bench.time_calls``,
...); the figures are in :mod:`fa_lab.viz`.
"""

from fa_lab.tools.bench.claims import (SPEED_CLAIMS_CSV, check_speed_claims, judge_speedup, speedup,
                                 targets_table)
from fa_lab.tools.bench.contenders import contenders
from fa_lab.tools.bench.harness import (TIMING_APART, TIMING_INTERLEAVED, Contender, Timings, flops,
                                        load_of, time_apart, time_calls, validate)
from fa_lab.tools.bench.studies import (BREAKDOWN_PARTS, backward_vs_forward, breakdown,
                                  decode_latency, retrieval_benchmark, time_generation)
from fa_lab.tools.bench.sweeps import (decode_splits, matmul_peak, run, run_with_env, sweep_blocks,
                                 thread_scaling)

__all__ = ["BREAKDOWN_PARTS", "Contender", "SPEED_CLAIMS_CSV", "TIMING_APART", "TIMING_INTERLEAVED",
           "Timings", "backward_vs_forward",
           "breakdown", "check_speed_claims", "contenders", "decode_latency", "decode_splits",
           "flops", "judge_speedup", "load_of", "matmul_peak", "retrieval_benchmark", "run",
           "run_with_env", "speedup", "sweep_blocks", "targets_table", "thread_scaling",
           "time_apart", "time_calls", "time_generation", "validate"]
