"""What a number was measured on: the machine, and how busy it was while measuring.

:func:`machine` describes the hardware and software (CPU, threads, SIMD, versions, BLAS
kernels); :func:`describe_machine` is its one-line form for figures and tables.

:class:`LoadMonitor` describes the *load* during one timing window. A timing on a
shared 2-core VM means little when something else ran beside it, so every timing
window of the harness records:

* ``load1_start``, ``load1_end``: the 1-minute load average (``os.getloadavg``), kept
  for the record. It is **not** the busy test: it counts fa_lab's own threads too (a
  2-thread kernel alone drives it towards 2 on a 2-core machine) and it lags a minute
  behind, so in a report, where lessons run back to back, it stays high after the
  previous lesson's timings even when nothing else runs.
* ``others``: the share of the machine's CPU time (all cores) that *other* processes
  used during the window: busy time from ``/proc/stat`` minus this process's own CPU
  time (``getrusage``, itself and its waited-for children).
* ``steal``: the share of CPU time the hypervisor gave to other guests (``/proc/stat``).

The window counts as **busy** when ``others > config.BUSY_OTHERS`` or
``steal > config.BUSY_STEAL``. A CPU hog spinning one core of two reads as
``others`` ~ 0.3-0.5; a quiet machine as 0.00-0.03 (measured on this project's VMs).
Where ``/proc/stat`` does not exist the window is ``unknown`` and never busy.
"""

from __future__ import annotations

import functools
import os
import platform
try:  # Unix only: without it (Windows) a process's own CPU time comes from time
    import resource
except ImportError:
    resource = None
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fa_lab.settings import config
from fa_lab.settings.blas import blas_libraries, cpu_flags
from fa_lab.settings import cpu_features
from fa_lab.settings.cpu_features import cpuinfo

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_model() -> str:
    return (cpuinfo() or {}).get("model name") or platform.processor() or platform.machine()


def _torch_version() -> str:
    try:
        import torch
    except ImportError:
        return "not installed"
    return torch.__version__


@functools.lru_cache(maxsize=1)
def codegen() -> dict:
    """What numba's code generation makes of this CPU: LLVM's CPU name (``llvm_cpu``), the
    width of the vectors a plain float32 loop compiles to, read from its assembly
    (``vector_bits``: 512, 256 or 128; None when it cannot be read), how that width was
    chosen (:data:`fa_lab.settings.config.VECTOR_WIDTH`) and the extensions numba may use
    (``extensions``). The loop is compiled once per process (about 0.3 s)."""
    import llvmlite.binding as llvm
    import numba
    from numba.core import config as numba_config

    bits = None
    if not numba_config.DISABLE_JIT:
        def dot(a, b):
            s = np.float32(0)
            for i in range(a.shape[0]):
                s += a[i] * b[i]
            return s

        probe = numba.njit(fastmath=config.FASTMATH)(dot)
        x = np.ones(64, np.float32)
        probe(x, x)
        asm = "\n".join(probe.inspect_asm().values())
        bits = 512 if "zmm" in asm else 256 if "ymm" in asm else 128
    return {"llvm_cpu": numba_config.CPU_NAME or llvm.get_host_cpu_name(),
            "vector_bits": bits, "vector_width": config.VECTOR_WIDTH_IN_USE,
            "extensions": "+".join(cpu_features.extensions()) or "none"}


def machine() -> dict:
    """The machine a number was measured on: CPU, cores, threads, SIMD, what numba's code
    generation makes of it (:func:`codegen`), versions, BLAS."""
    import numba

    import scipy.linalg.blas  # noqa: F401  (loads SciPy's BLAS: the one the kernels call)

    flags = cpu_flags()
    if flags:
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
    else:  # no /proc/cpuinfo (macOS, Windows): what LLVM sees, from the CPU itself
        llvm = cpu_features.llvm_features()
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512vnni", "avx512bf16", "neon",
                            "sve") if llvm.get(f)]
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "simd": "+".join(simd) or "unknown",
        **codegen(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "os": platform.platform(terse=True),
        "torch": _torch_version(),
        "blas": ", ".join(f"{b['owner']} OpenBLAS {b['version']} {b['kernels']}"
                          for b in blas_libraries()),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "(auto)"),
        "threading_layer": config.THREADING_LAYER_IN_USE,
    }


def cuda_device() -> str | None:
    """``"gpu"`` when an NVIDIA device node exists, ``"simulator"`` when numba's CUDA
    simulator is enabled (``NUMBA_ENABLE_CUDASIM=1``), else None. Imports nothing: numba's
    CUDA target is loaded only by the GPU kernel itself (:mod:`fa_lab.tools.gpu`)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1":
        return "simulator"
    if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists():
        return "gpu"
    return None


def describe_machine() -> str:
    """One line for the foot of every figure and table."""
    m = machine()
    return (f"{m['cpu']} | {m['cores']} cores, {m['numba_threads']} numba threads | "
            f"{m['simd']}; LLVM {m['llvm_cpu']}, {m['vector_bits']}-bit vectors | Python {m['python']}, NumPy {m['numpy']}, numba {m['numba']}, "
            f"torch {m['torch']} | BLAS {m['blas']} | OPENBLAS_CORETYPE "
            f"{m['openblas_coretype']}")


def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds of the whole machine since boot, or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]] + [0] * max(0, 8 - len(fields[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    busy = user + nice + system + irq + softirq
    return busy / _CLK_TCK, steal / _CLK_TCK, (busy + idle + iowait + steal) / _CLK_TCK


def _own_cpu() -> float:
    """CPU seconds used by this process (all threads) and its waited-for children."""
    if resource is None:
        return time.process_time()  # this process only (no waited-for children)
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@dataclass(frozen=True)
class Load:
    """The machine's load during one timing window (see the module docstring)."""

    seconds: float
    load1_start: float
    load1_end: float
    others: float  # share of all cores' time used by other processes (nan: unknown)
    steal: float  # share stolen by the hypervisor (nan: unknown)

    @property
    def known(self) -> bool:
        return not (np.isnan(self.others) or np.isnan(self.steal))

    @property
    def busy(self) -> bool:
        return self.known and (self.others > config.BUSY_OTHERS or self.steal > config.BUSY_STEAL)

    @property
    def reason(self) -> str:
        """Why the window counts as busy ('' when it does not)."""
        if not self.busy:
            return ""
        parts = []
        if self.others > config.BUSY_OTHERS:
            parts.append(f"other processes used {100 * self.others:.0f}% of the CPU")
        if self.steal > config.BUSY_STEAL:
            parts.append(f"CPU steal {100 * self.steal:.0f}%")
        return ", ".join(parts)

    def columns(self) -> dict:
        """The columns every result row carries."""
        return {"load1_start": self.load1_start, "load1_end": self.load1_end,
                "others_pct": 100 * self.others, "steal_pct": 100 * self.steal,
                "busy": self.busy}

    @staticmethod
    def merge(loads) -> "Load":
        """One window standing for several: the worst share of each kind, so a result
        built from several windows is busy when any of them was."""
        loads = [x for x in loads if x is not None and x.known]
        if not loads:
            return Load(0.0, float("nan"), float("nan"), float("nan"), float("nan"))
        return Load(sum(x.seconds for x in loads), loads[0].load1_start, loads[-1].load1_end,
                    max(x.others for x in loads), max(x.steal for x in loads))


#: Every window measured in this process, oldest first (lessons read it for footers).
LOG: list[Load] = []


def _pids_cpu(pids) -> float:
    """CPU seconds used so far by the running processes ``pids`` (all their threads),
    from ``/proc/PID/stat``; 0 for a pid that cannot be read."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class LoadMonitor:
    """Context manager: ``with LoadMonitor() as mon: ...``; then ``mon.load``.

    ``pids``: running child processes whose CPU time counts as this measurement's own
    (the workers of :func:`fa_lab.tools.bench.isolated.time_isolated`), not as others'."""

    def __init__(self, pids=()):
        self.pids = tuple(pids)

    def _own(self) -> float:
        return _own_cpu() + _pids_cpu(self.pids)

    def __enter__(self) -> "LoadMonitor":
        self._load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        self._stat, self._own0, self._t0 = _proc_stat(), self._own(), time.perf_counter()
        self.load = None
        return self

    def __exit__(self, *exc) -> None:
        short = config.MIN_LOAD_WINDOW_S - (time.perf_counter() - self._t0)
        if short > 0:  # too few /proc/stat ticks to judge: wait, idle, and count others
            time.sleep(short)
        wall = time.perf_counter() - self._t0
        stat, own = _proc_stat(), self._own()
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        others = steal = float("nan")
        if stat is not None and self._stat is not None:
            busy, st, total = (b - a for a, b in zip(self._stat, stat))
            capacity = max(total, wall * (os.cpu_count() or 1), 1e-9)
            others = min(1.0, max(0.0, busy - (own - self._own0)) / capacity)
            steal = min(1.0, max(0.0, st) / capacity)
        self.load = Load(wall, self._load1, load1, others, steal)
        LOG.append(self.load)


def load_summary(loads) -> str:
    """'quiet (others 2%, steal 0%)' or 'machine busy: other processes used 41% ...'."""
    m = Load.merge(loads)
    if not m.known:
        return "load unknown (no /proc/stat)"
    if m.busy:
        return f"measured under load: {m.reason} (1-min load {m.load1_end:.2f})"
    return (f"quiet: other processes {100 * m.others:.0f}% of the CPU, steal "
            f"{100 * m.steal:.0f}%, 1-min load {m.load1_end:.2f}")


__all__ = ["machine", "describe_machine", "Load", "LoadMonitor", "LOG", "load_summary"]
