"""Time contenders each in its own process, so that none runs while another one's threads
are still busy.

In one process, PyTorch's OpenMP workers keep spinning after each of its calls and take
the cores from whatever runs next: on an Intel Xeon VM fa_lab's decode read 0.54x torch
with single calls alternating in one process, 0.88x with each side in its own process,
and 1.23x with ``OMP_WAIT_POLICY=PASSIVE`` (which slowed torch itself from 0.38 to 0.54
ms). A user runs either one, not both at once, so the fair number is each side alone.

:func:`time_isolated` starts one worker process per contender (``python -c``, speaking
JSON lines on its pipes). A worker builds its call from a factory of this module, checks
it against the float64 reference once, and then, on request, times ``calls`` calls back
to back. The harness alternates the workers round by round (so the VM's drift hits all
alike), waits ``gap_s`` between two workers' turns (the previous worker's threads go to
sleep meanwhile; no thread of one contender runs while the other is timed), and records
the machine's load over the whole window. Rows say ``timing = "separate processes"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from fa_lab.api import attention
from fa_lab.features.int8 import attention_int8
from fa_lab.features.kvcache import attention_with_kvcache
from fa_lab.numerics import reference
from fa_lab.numerics.testing import Case
from fa_lab.settings.machine import LoadMonitor
from fa_lab.tools.bench.contenders import contenders, torch_module
from fa_lab.tools.bench.harness import Contender, Timings, validate

#: How the rows produced here were timed.
TIMING = "separate processes, alternating rounds"

_WORKER = r"""
import importlib, json, sys, time
spec = json.loads(sys.stdin.readline())
module, _, name = spec["factory"].partition(":")
fn = getattr(importlib.import_module(module), name)(**spec["kwargs"])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if "quit" in cmd:
        break
    for _ in range(cmd["warmup"]):
        fn()
    times = []
    for _ in range(cmd["calls"]):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}), flush=True)
"""


def attention_call(kernel="flash", B=1, H=8, H_kv=None, Nq=2048, Nk=None, d=64, causal=False,
                   pv_dtype=None, seed=0):
    """A validated, ready-to-time call on fixed float32 inputs (the factory workers run):
    ``kernel`` a name of :data:`fa_lab.KERNELS`, ``"torch_sdpa"`` (PyTorch's CPU SDPA,
    float32), or ``"int8"`` / ``"int8:NAME"`` (``attention_int8`` with ``kernel="auto"``
    or ``NAME``, and ``pv_dtype``), or ``"kvcache"`` / ``"kvcache:NAME"``
    (``attention_with_kvcache``, k and v as a full contiguous cache). ``Nq = 1`` is a
    decode step (one query sees every key, as bottom-right causal). Returns ``fn()``."""
    q, k, v = Case(B=B, H=H, H_kv=H_kv, Nq=Nq, Nk=Nk, d=d).inputs(np.float32, seed=seed)
    if kernel == "torch_sdpa":
        if torch_module() is None:
            raise RuntimeError("torch is not installed")
        (c,) = [c for c in contenders([], causal=causal) if c.name == "torch_sdpa"]
    elif kernel.split(":")[0] == "int8":
        name = kernel.partition(":")[2] or "auto"
        c = Contender(kernel, lambda q, k, v: attention_int8(
            q, k, v, causal=causal, kernel=name, pv_dtype=pv_dtype or "float32"), "kernel")
    elif kernel.split(":")[0] == "kvcache":
        name = kernel.partition(":")[2] or "auto"
        c = Contender(kernel, lambda q, k, v: attention_with_kvcache(
            q, k, v, cache_seqlens=k.shape[2], causal=True, kernel=name), "kernel")
        causal = "bottom_right"
    else:
        c = Contender(kernel, lambda q, k, v: attention(q, k, v, causal=causal, kernel=kernel),
                      "kernel")
    if kernel.split(":")[0] == "int8":  # INT8 scores: judged by cosine, as lesson 10 does
        out = c.fn(q, k, v).astype(np.float64).ravel()
        ref = reference.attention(q, k, v, causal=causal)[0].ravel()
        cos = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref)))
        if not cos >= 0.999:
            raise AssertionError(f"{kernel}: cosine {cos:.6f} < 0.999 against float64")
    else:
        validate(c, q, k, v, causal)
    return lambda: c.fn(q, k, v)


class _Worker:
    def __init__(self, name, factory, kwargs, env):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        self.send({"factory": factory, "kwargs": kwargs})

    def send(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"worker {self.name!r} failed:\n{err[-3000:]}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send({"quit": 1})
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


def time_isolated(specs: dict, *, rounds=5, calls=3, warmup=2, gap_s=0.3) -> Timings:
    """Time each contender in its own process (module docstring).

    ``specs``: ``{name: (factory, kwargs)}`` or ``{name: (factory, kwargs, env)}`` with
    ``factory`` a ``"module:function"`` returning a ready call (e.g.
    ``"fa_lab.tools.bench.isolated:attention_call"``) and ``env`` extra environment
    variables for that worker only. Returns :class:`Timings` with ``rounds * calls``
    seconds per contender and the load of the whole window."""
    workers = []
    try:
        for name, spec in specs.items():
            factory, kwargs, env = (*spec, None)[:3]
            workers.append(_Worker(name, factory, kwargs, env))
        for w in workers:  # build, validate and compile, one at a time
            w.receive()
        times = Timings({w.name: [] for w in workers})
        with LoadMonitor(pids=[w.proc.pid for w in workers]) as monitor:
            for r in range(rounds):
                order = workers if r % 2 == 0 else workers[::-1]
                for w in order:
                    time.sleep(gap_s)
                    w.send({"warmup": warmup, "calls": calls})
                    times[w.name] += w.receive()["times"]
        times.load = monitor.load
        return times
    finally:
        for w in workers:
            w.close()
