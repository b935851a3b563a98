"""``python -m fa_lab ring``: ring attention over local processes (or under ``torchrun``).

:func:`launch` starts ``nproc`` worker processes on this machine (gloo over loopback,
``MASTER_ADDR=127.0.0.1`` and a free port), each with ``threads`` numba threads. Every
worker builds the same random problem from ``seed``, takes its shard, and

1. runs :func:`fa_lab.distributed.ring_attention` once (compiles; checks nothing yet);
2. times the transfers alone: one ring pass of the K/V blocks with no compute
   (``transfer_ms`` per step);
3. times ``repeats`` rounds; each round is the ring call on every rank (between two
   barriers; the slowest rank's time is the round's) and, with ``baseline``, then the
   single-process ``fa_lab.attention`` on rank 0 with ``baseline_threads`` threads
   while the other ranks wait at a barrier: both sides alternate, so drift hits both;
4. checks the gathered output against the float64 result within the tolerance table's
   float32 rule (the single-process float32 ``flash`` as the same-precision baseline).

Rank 0 returns (prints, or writes as JSON) the per-step compute and exposed-wait times,
the transfer times, the round times and the check. Under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set) ``python -m fa_lab ring`` is itself a worker::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m fa_lab ring --N 8192 --causal --layout zigzag

(the gloo traffic then crosses the network; set ``GLOO_SOCKET_IFNAME`` to the interface).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numba
import numpy as np

from fa_lab.api import attention
from fa_lab.distributed import ring_attention, shard, unshard
from fa_lab.numerics.testing import ToleranceError, assert_close
from fa_lab.settings.machine import LoadMonitor

#: What a worker needs to build its problem (the options of ``python -m fa_lab ring``).
DEFAULTS = dict(N=1024, B=1, H=8, H_kv=None, d=64, causal=False, layout="contiguous",
                threads=1, repeats=3, baseline=False, baseline_threads=None, seed=0,
                pad=0, timeout=120.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem(spec):
    """The full ``q, k, v`` (float32) and key mask (None unless ``pad``: the last ``pad``
    keys of the first sequence are padding) every rank builds from ``spec["seed"]``."""
    rng = np.random.default_rng(spec["seed"])
    B, H, N, d = spec["B"], spec["H"], spec["N"], spec["d"]
    H_kv = spec["H_kv"] or H
    q = rng.standard_normal((B, H, N, d), dtype=np.float32)
    k = rng.standard_normal((B, H_kv, N, d), dtype=np.float32)
    v = rng.standard_normal((B, H_kv, N, d), dtype=np.float32)
    mask = None
    if spec["pad"]:
        mask = np.ones((B, N), bool)
        mask[0, N - spec["pad"]:] = False
    return q, k, v, mask


def _transfer_pass(block, rank, world, timeout):
    """One ring pass of ``block`` with no compute: seconds per step."""
    import torch.distributed as dist

    bufs, times = [block, block.clone()], []
    for step in range(world - 1):
        dist.barrier()
        t0 = time.perf_counter()
        works = [dist.isend(bufs[step % 2], (rank + 1) % world),
                 dist.irecv(bufs[(step + 1) % 2], (rank - 1) % world)]
        for w in works:
            w.wait(timeout=timedelta(seconds=timeout))
        times.append(time.perf_counter() - t0)
    return times


def worker(spec: dict) -> dict | None:
    """One rank's part (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
    environment); rank 0 returns the results, the others None."""
    import torch
    import torch.distributed as dist

    spec = {**DEFAULTS, **spec}
    dist.init_process_group("gloo", init_method="env://",
                            timeout=timedelta(seconds=spec["timeout"]))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        numba.set_num_threads(spec["threads"])
        torch.set_num_threads(spec["threads"])
        layout, causal, timeout = spec["layout"], spec["causal"], spec["timeout"]
        q, k, v, mask = problem(spec)
        mine = [shard(x, rank, world, layout) for x in (q, k, v)]
        my_mask = None if mask is None else shard(mask, rank, world, layout, axis=1)
        kw = dict(causal=causal, layout=layout, key_mask=my_mask, timeout=timeout)
        ring_attention(*mine, **kw)  # compile
        if spec["baseline"] and rank == 0:  # compile the baseline too
            numba.set_num_threads(spec["baseline_threads"] or numba.config.NUMBA_NUM_THREADS)
            attention(q, k, v, causal=causal,
                      mask=None if mask is None else mask[:, None, None, :])
            numba.set_num_threads(spec["threads"])
        transfer = _transfer_pass(torch.from_numpy(np.stack(mine[1:])), rank, world, timeout)
        rounds, steps, base = [], [], []
        peers = [None] * world  # the ranks on this machine count as this run's own CPU time
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        here = [pid for host, pid in peers if host == socket.gethostname() and pid != os.getpid()]
        monitor = LoadMonitor(pids=here).__enter__() if rank == 0 else None
        for _ in range(spec["repeats"]):
            dist.barrier()
            timings = []
            t0 = time.perf_counter()
            out, lse = ring_attention(*mine, return_lse=True, timings=timings, **kw)
            took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            rounds.append(float(took))
            steps.append(timings)
            if spec["baseline"]:
                dist.barrier()
                if rank == 0:
                    numba.set_num_threads(spec["baseline_threads"] or
                                          numba.config.NUMBA_NUM_THREADS)
                    t0 = time.perf_counter()
                    attention(q, k, v, causal=causal,
                              mask=None if mask is None else mask[:, None, None, :])
                    base.append(time.perf_counter() - t0)
                    numba.set_num_threads(spec["threads"])
        dist.barrier()
        if monitor is not None:
            monitor.__exit__(None, None, None)
        parts = [None] * world
        dist.all_gather_object(parts, {"out": out, "lse": lse, "steps": steps,
                                       "transfer": transfer})
        if rank != 0:
            return None
        return _summary(spec, world, q, k, v, mask, parts, rounds, base, monitor.load)
    finally:
        dist.destroy_process_group()


def _summary(spec, world, q, k, v, mask, parts, rounds, base, load):
    layout, causal = spec["layout"], spec["causal"]
    out = unshard([p["out"] for p in parts], layout)
    m = None if mask is None else mask[:, None, None, :]
    numba.set_num_threads(spec["baseline_threads"] or numba.config.NUMBA_NUM_THREADS)
    flash32 = attention(q, k, v, causal=causal, mask=m)
    exact = attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal, mask=m)
    try:
        check = assert_close(out, exact, baseline=flash32, what="ring output",
                             magnitude=np.abs(v).max())
        check = {"ok": True, "max_error": check["max_error"], "allowed": check["allowed"]}
    except ToleranceError as exc:
        check = {"ok": False, "error": str(exc)}
    check["max_diff_vs_flash"] = float(np.abs(out - flash32).max())
    per_step = [{"rank": r, "round": i, **s} for r, p in enumerate(parts)
                for i, round_ in enumerate(p["steps"]) for s in round_]
    transfer = [{"rank": r, "step": i, "transfer_s": t} for r, p in enumerate(parts)
                for i, t in enumerate(p["transfer"])]
    return {"spec": spec, "world": world, "check": check, "round_s": rounds,
            "baseline_s": base, "steps": per_step, "transfer": transfer,
            "bytes_per_step": int(2 * np.prod(k.shape) // world * k.itemsize),
            "load": load.columns() if load is not None else None}


def launch(nproc: int, timeout_s: float = 600.0, **options) -> dict:
    """Run :func:`worker` on ``nproc`` local processes; returns rank 0's results.

    ``options``: the keys of :data:`DEFAULTS` (anything else is refused). Each worker
    gets ``threads`` numba and OpenMP threads; the whole run is killed after
    ``timeout_s`` seconds (a TimeoutError), and a failed worker's stderr is raised."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"launch() got unknown options {sorted(unknown)}; known: "
                        f"{sorted(DEFAULTS)}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    spec = {**DEFAULTS, **options}
    threads = max(spec["threads"], spec["baseline_threads"] or 0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(nproc), "NUMBA_NUM_THREADS": str(max(threads, 2)),
               "OMP_NUM_THREADS": str(spec["threads"]), "FA_LAB_RING_RESULT": str(result)}
        cmd = [sys.executable, "-m", "fa_lab.tools.ring", json.dumps(spec)]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(nproc)]
        deadline = time.monotonic() + timeout_s
        errors = []
        for r, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise TimeoutError(f"ring workers still running after {timeout_s} s") from None
            if p.returncode:
                errors.append(f"rank {r} exited with {p.returncode}: {err.strip()[-2000:]}")
        if errors:
            raise RuntimeError("; ".join(errors))
        return json.loads(result.read_text())


def step_table(result: dict):
    """Per ring step, the slowest rank's median over rounds: compute, exposed wait (the
    communication not hidden behind compute) and the transfer alone, in ms."""
    import pandas as pd

    steps = pd.DataFrame(result["steps"])
    per = steps.groupby(["step", "rank"])[["compute_s", "wait_s"]].median()
    per = per.groupby("step").max() * 1e3
    transfer = pd.DataFrame(result["transfer"])
    alone = (transfer.groupby(["step", "rank"])["transfer_s"].median().groupby("step").max()
             * 1e3) if len(transfer) else pd.Series(dtype=float)
    table = pd.DataFrame({"step": per.index, "compute_ms": per["compute_s"].values,
                          "exposed_wait_ms": per["wait_s"].values})
    table["transfer_alone_ms"] = [alone.get(s, 0.0) for s in table["step"]]
    table["MiB_sent"] = [result["bytes_per_step"] / 2**20 if s < result["world"] - 1 else 0
                         for s in table["step"]]
    return table


def describe(result: dict) -> str:
    """A few lines for the terminal: the check, the steps, the rounds (and the baseline)."""
    spec, check = result["spec"], result["check"]
    lines = [f"ring attention: world={result['world']}, threads/rank={spec['threads']}, "
             f"B={spec['B']} H={spec['H']} H_kv={spec['H_kv'] or spec['H']} N={spec['N']} "
             f"d={spec['d']} causal={spec['causal']} layout={spec['layout']}",
             ("check: ok, max error %.2e (allowed %.2e) vs float64; max |ring - flash| %.2e"
              % (check["max_error"], check["allowed"], check["max_diff_vs_flash"]))
             if check["ok"] else f"check: FAILED: {check['error']}",
             step_table(result).to_string(index=False, float_format=lambda x: f"{x:.2f}")]
    med = float(np.median(result["round_s"]))
    lines.append(f"ring call: median {med * 1e3:.1f} ms over {len(result['round_s'])} rounds")
    if result["baseline_s"]:
        base = float(np.median(result["baseline_s"]))
        lines.append(f"single process ({spec['baseline_threads'] or 'all'} threads): median "
                     f"{base * 1e3:.1f} ms; ring / single = {med / base:.2f}")
    return "\n".join(lines)


def add_parser(sub, positive_int, output_file):
    """The ``ring`` subcommand of ``python -m fa_lab`` (its options are :data:`DEFAULTS`)."""
    g = sub.add_parser("ring", help="ring attention over local processes (gloo), checked "
                       "and timed; under torchrun, one rank of it")
    g.add_argument("--nproc", type=positive_int, default=2, help="local processes")
    for name in ("N", "B", "H", "d"):
        g.add_argument(f"--{name}", type=positive_int, default=DEFAULTS[name])
    g.add_argument("--H-kv", dest="H_kv", type=positive_int, default=None)
    g.add_argument("--causal", action="store_true")
    g.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    g.add_argument("--threads", type=positive_int, default=1, help="numba threads per rank")
    g.add_argument("--repeats", type=positive_int, default=3)
    g.add_argument("--baseline", action="store_true",
                   help="also time the single-process call, alternating with the ring")
    g.add_argument("--baseline-threads", type=positive_int, default=None)
    g.add_argument("--pad", type=int, default=0, help="padding keys at the end of sequence 0")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout", type=positive_int, default=120,
                   help="seconds each communication may take")
    g.add_argument("--json", type=output_file, default=None, help="write the results here")
    g.set_defaults(func=cli)
    return g


def check_options(args) -> str | None:
    """Cross-option checks for ``python -m fa_lab ring`` (a usage error, before any work)."""
    if args.H_kv and args.H % args.H_kv:
        return f"--H {args.H} must be a multiple of --H-kv {args.H_kv}"
    parts = args.nproc * (2 if args.layout == "zigzag" else 1)
    if args.N % parts:
        return f"--N {args.N} must be divisible by {parts} (--nproc, x2 for zigzag)"
    if not 0 <= args.pad < args.N:
        return f"--pad must be in [0, N), got {args.pad}"
    return None


def cli(args) -> int:
    """``python -m fa_lab ring``: launch (or, under torchrun, be one rank), print, save."""
    spec = {k: getattr(args, k) for k in DEFAULTS if k != "timeout"}
    spec["timeout"] = float(args.timeout)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: a worker
        result = worker(spec)
    else:
        result = launch(args.nproc, timeout_s=10 * args.timeout, **spec)
    if result is None:
        return 0
    print(describe(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, default=float))
    return 0 if result["check"]["ok"] else 1


def main(spec_json: str) -> int:
    result = worker(json.loads(spec_json))
    if result is not None:
        path = os.environ.get("FA_LAB_RING_RESULT")
        text = json.dumps(result, default=float)
        if path:
            Path(path).write_text(text)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
