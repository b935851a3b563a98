"""Lesson 13's measurements: the shared-prefix speedup, ring runs, and when a ring hides
its transfers (every number from this run; the sentences are computed from them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fa_lab.api import attention
from fa_lab.features.cascade import cascade_attention
from fa_lab.numerics import verdict
from fa_lab.tools.bench.harness import Contender, load_of, time_calls


def cascade_inputs(B, P, S, H=8, H_kv=8, d=64, Nq=1, seed=0):
    """A shared prefix ``(H_kv, P, d)``, suffixes ``(B, H_kv, S, d)``, and the same keys
    laid out per sequence (``(B, H_kv, P + S, d)``: what recomputing reads)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, d), dtype=np.float32)
    kp, vp = (rng.standard_normal((H_kv, P, d), dtype=np.float32) for _ in range(2))
    ks, vs = (rng.standard_normal((B, H_kv, S, d), dtype=np.float32) for _ in range(2))
    full = [np.ascontiguousarray(np.concatenate([np.broadcast_to(p, (B,) + p.shape), s], 2))
            for p, s in ((kp, ks), (vp, vs))]
    return q, kp, vp, ks, vs, full[0], full[1]


def cascade_sweep(batches, P, S, *, H=8, H_kv=8, d=64, Nq=1, repeats=15) -> pd.DataFrame:
    """For each batch size ``B``: ``cascade_attention`` (the prefix once) against one
    ``attention`` call over every sequence's own copy of prefix + suffix (bottom-right
    causal both), timed side by side; the speedup with its quartile range, the K/V bytes
    each reads, and the load."""
    rows = []
    for B in batches:
        q, kp, vp, ks, vs, K, V = cascade_inputs(B, P, S, H, H_kv, d, Nq)
        recompute = Contender("recompute", lambda: attention(q, K, V, causal="bottom_right"),
                              "baseline")
        cascade = Contender("cascade", lambda: cascade_attention(q, kp, vp, ks, vs,
                                                                 causal=True), "kernel")
        diff = float(np.abs(cascade.fn() - recompute.fn()).max())
        # both sides run fa_lab's own threads (no foreign pool to let settle): short pauses
        t = time_calls([recompute, cascade], (), repeats=repeats, cooldown=0.01)
        low, mid, high = t.ratio("recompute", "cascade")
        itemsize = 4
        rows.append({"B": B, "P": P, "S": S, "Nq": Nq,
                     "recompute_ms": 1e3 * verdict.quartiles(t["recompute"])[1],
                     "cascade_ms": 1e3 * verdict.quartiles(t["cascade"])[1],
                     "speedup": mid, "speedup_low": low, "speedup_high": high,
                     "kv_MiB_recompute": 2 * B * H_kv * (P + S) * d * itemsize / 2**20,
                     "kv_MiB_cascade": 2 * H_kv * (P + B * S) * d * itemsize / 2**20,
                     "max_abs_diff": diff, **t.load.columns()})
    return pd.DataFrame(rows)


def per_rank_compute(result, column="cpu_s") -> pd.DataFrame:
    """Measured compute per rank and step (ms, median over rounds) of a ring run: CPU
    time by default (the work itself, even with more ranks than cores), or
    ``column="compute_s"`` for the wall time."""
    steps = pd.DataFrame(result["steps"])
    per = steps.groupby(["rank", "step"])[column].median().unstack("step") * 1e3
    return per


def overlap_verdict(result, need=1.3) -> verdict.Verdict:
    """The ring call against the single process (``baseline=True``): its time ratio, on
    quartile ranges and the run's load, judged against ``need``."""
    low, mid, high = verdict.ratio_range(result["round_s"], result["baseline_s"])
    spec = result["spec"]
    what = (f"ring, world={result['world']} x {spec['threads']} thread, vs one process "
            f"with {spec['baseline_threads']} threads (N={spec['N']}, H={spec['H']}, "
            f"causal={spec['causal']}, {spec['layout']})")
    return verdict.judge(what, mid, need, at_least=False, low=low, high=high,
                         load=load_of(result["load"]) if result["load"] else None)


def hidden_transfer(result) -> dict:
    """How much of the transfer the compute hid: the exposed wait against the transfer
    alone, summed over the steps that send (slowest rank per step)."""
    steps = pd.DataFrame(result["steps"])
    sends = steps[steps["bytes"] > 0]
    exposed = sends.groupby(["step", "rank"])["wait_s"].median().groupby("step").max().sum()
    compute = sends.groupby(["step", "rank"])["compute_s"].median().groupby("step").max().sum()
    tr = pd.DataFrame(result["transfer"])
    alone = tr.groupby(["step", "rank"])["transfer_s"].median().groupby("step").max().sum()
    return {"exposed_ms": 1e3 * exposed, "transfer_ms": 1e3 * alone,
            "compute_ms": 1e3 * compute,
            "hidden_share": 1.0 - exposed / alone if alone > 0 else float("nan")}


def flops_per_second(result) -> float:
    """The rank's measured attention rate during the ring (FLOP/s over the full,
    non-diagonal steps of a non-causal run; the FLOP count of the harness)."""
    spec, world = result["spec"], result["world"]
    n = spec["N"] // world
    work = 4 * spec["B"] * spec["H"] * n * n * spec["d"]
    steps = pd.DataFrame(result["steps"])
    return work / float(steps["compute_s"].median())


def hide_threshold(F, bandwidth, *, H=8, H_kv=8, itemsize=4) -> float:
    """The shard length ``N_local`` from which one non-causal ring step's compute
    (``4 H N_local^2 d`` FLOPs at ``F`` FLOP/s) lasts as long as its transfer
    (``2 H_kv N_local d`` elements of ``itemsize`` bytes at ``bandwidth`` B/s):
    ``N_local = 2 H_kv itemsize F / (4 H bandwidth)`` (``d`` and the batch cancel)."""
    return 2 * H_kv * itemsize * F / (4 * H * bandwidth)


__all__ = ["cascade_sweep", "cascade_inputs", "overlap_verdict", "hidden_transfer",
           "per_rank_compute", "flops_per_second", "hide_threshold"]
