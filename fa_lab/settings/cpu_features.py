"""Which SIMD instruction sets this CPU offers the micro-kernels, detected at run time.

The low-precision micro-kernels (:mod:`fa_lab.kernels.lowprec.microkernels`) call LLVM target
intrinsics. LLVM refuses to compile an intrinsic the target CPU lacks ("Cannot select"),
so a kernel that uses ``vpdpbusd`` must never be compiled on a CPU without AVX512-VNNI.
This module says which paths are available:

=================  ================================  =====================================
path               needs                             instruction
=================  ================================  =====================================
scores ``vnni``    avx512f, avx512bw, avx512vnni     ``vpdpbusd`` (u8 x s8, 64 MACs/zmm)
scores ``i16``     avx512f, avx512bw                 ``vpmaddwd`` (s16 x s16, 32 MACs/zmm)
``P V`` ``bf16``   avx512f, avx512bf16               ``vdpbf16ps`` (bf16 pairs, fp32 acc)
``P V`` ``fp32``   avx512f                           ``vfmadd231ps`` (16 FMAs/zmm)
``amx`` (both)     amx-tile, amx-int8, amx-bf16,     ``tdpbssd``, ``tdpbf16ps`` (tiles of
                   avx512f, avx512bw, avx512bf16     16 x 64 bytes; the softmax in zmm)
=================  ================================  =====================================

AMX also needs the kernel's permission for the tile state (:func:`amx_permission`, one
``arch_prctl`` per process); when it is refused, AMX is unavailable and
:func:`amx_unavailable` says why.

A CPU without AVX-512 at all gets no micro-kernel (``attention_int8(kernel="auto")``
then uses the plain-loop ``simd`` kernel and says so).

Detection reads what numba compiles for: llvmlite's host CPU features (the same map
numba uses; ``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME`` in the environment override the
host, and are honoured here), cross-checked with ``/proc/cpuinfo``'s flags where that
file exists (a feature counts only if both agree). Tests and lessons can *remove*
features to force the fallback paths on any machine:

* the environment variable ``FA_LAB_CPU_FEATURES`` (e.g. ``"-avx512vnni,-avx512bf16"``),
  read at every call;
* :func:`forced` (a context manager) in-process, e.g. ``with forced(vnni=False): ...``.

Only removing is allowed: claiming a feature the CPU lacks would crash the compiler
(a ``ValueError`` says so).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace

from fa_lab.settings import config  # noqa: F401  (sets numba's CPU features first)

#: Environment variable that removes features: comma-separated ``-name`` items.
ENV = "FA_LAB_CPU_FEATURES"

#: Our names -> (LLVM feature name, /proc/cpuinfo flag).
FEATURES = {
    "avx512f": ("avx512f", "avx512f"),
    "avx512bw": ("avx512bw", "avx512bw"),
    "vnni": ("avx512vnni", "avx512_vnni"),
    "bf16": ("avx512bf16", "avx512_bf16"),
    "amx": ("amx-tile", "amx_tile"),
    "amx_int8": ("amx-int8", "amx_int8"),
    "amx_bf16": ("amx-bf16", "amx_bf16"),
}


@dataclass(frozen=True)
class Features:
    """The features the micro-kernels care about (True = usable)."""

    avx512f: bool = False
    avx512bw: bool = False
    vnni: bool = False
    bf16: bool = False
    amx: bool = False
    amx_int8: bool = False
    amx_bf16: bool = False
    source: str = ""

    @property
    def amx_path(self) -> bool:
        """The AMX kernels' needs: tiles with INT8 and BF16, and AVX-512 (BW, BF16) for
        their softmax."""
        return all((self.amx, self.amx_int8, self.amx_bf16, self.avx512f, self.avx512bw,
                    self.bf16))

    @property
    def score_path(self) -> str | None:
        """``"vnni"``, ``"i16"`` (vpmaddwd) or None (no AVX-512 micro-kernel)."""
        if not (self.avx512f and self.avx512bw):
            return None
        return "vnni" if self.vnni else "i16"

    def pv_path(self, pv_dtype: str) -> str | None:
        """``"bf16"``, ``"fp32"`` or None, for a requested ``pv_dtype``."""
        if not self.avx512f:
            return None
        return "bf16" if pv_dtype == "bfloat16" and self.bf16 else "fp32"

    def note(self, pv_dtype: str = "float32") -> str:
        """One sentence on the paths chosen and why (for ``plan()``-style output)."""
        sp = self.score_path
        if sp is None:
            return ("no AVX-512 (avx512f + avx512bw): no INT8 micro-kernel; the plain-loop "
                    "'simd' kernel is used")
        scores = ("Q K^T with vpdpbusd (AVX512-VNNI)" if sp == "vnni" else
                  "Q K^T with vpmaddwd (AVX512BW; no AVX512-VNNI on this CPU)")
        pv = self.pv_path(pv_dtype)
        if pv_dtype == "bfloat16" and pv == "fp32":
            pvs = "P V in fp32 FMAs (pv_dtype='bfloat16' asked, but no AVX512-BF16)"
        else:
            pvs = "P V with vdpbf16ps (AVX512-BF16)" if pv == "bf16" else "P V in fp32 FMAs"
        return f"{scores}; {pvs} [{self.source}]"


def cpuinfo(path="/proc/cpuinfo") -> dict[str, str] | None:
    """The first processor's fields of ``/proc/cpuinfo`` (``"model name"``, ``"flags"``,
    ...): the one reader of that file. None where it does not exist (not Linux)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends here
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return None
    return fields


def proc_flags(path="/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags from :func:`cpuinfo` (None without ``/proc/cpuinfo``)."""
    info = cpuinfo(path)
    return None if info is None else set(info.get("flags", "").split())


@functools.lru_cache(maxsize=1)
def _llvm_features() -> dict[str, bool]:
    """The feature map numba compiles for: numba's CPU features (``NUMBA_CPU_FEATURES``,
    empty for ``NUMBA_CPU_NAME=generic``, or the host's as :mod:`fa_lab.settings.config`
    set them), else the host's."""
    import llvmlite.binding as llvm
    from numba.core import config as numba_config

    text = numba_config.CPU_FEATURES
    if text is None:
        text = llvm.get_host_cpu_features().flatten()
    out = {}
    for item in text.split(","):
        item = item.strip()
        if item[:1] in "+-" and len(item) > 1:
            out[item[1:]] = item[0] == "+"
    return out


def _removed(text: str | None) -> set[str]:
    """Our feature names removed by ``FA_LAB_CPU_FEATURES`` (``ValueError`` on '+x' or
    an unknown name)."""
    out = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name = item.lstrip("-+")
        if name not in FEATURES and name not in {v[0] for v in FEATURES.values()}:
            raise ValueError(f"{ENV}: unknown feature {name!r}; known: {sorted(FEATURES)}")
        if not item.startswith("-"):
            raise ValueError(f"{ENV}: only removing features is allowed ('-{name}'): "
                             "claiming one the CPU lacks would crash the compiler")
        out.add(next(k for k, v in FEATURES.items() if name in (k, v[0])))
    return out


_FORCED: list[set[str]] = []


@functools.lru_cache(maxsize=1)
def _host() -> Features:
    llvm, proc = _llvm_features(), proc_flags()
    have = {}
    for name, (lname, flag) in FEATURES.items():
        ok = llvm.get(lname, False)
        if proc is not None:
            ok = ok and flag in proc
        have[name] = ok
    src = "llvmlite host features" + (" and /proc/cpuinfo" if proc is not None else "")
    return Features(**have, source=src)


def detect() -> Features:
    """The usable features now: the host's, minus ``FA_LAB_CPU_FEATURES`` and
    :func:`forced` removals."""
    host = _host()
    removed = _removed(os.environ.get(ENV))
    for r in _FORCED:
        removed |= r
    if not removed:
        return host
    # implied: no avx512f -> nothing; no avx512bw -> no vnni (our kernels need both)
    if "avx512f" in removed:
        removed |= set(FEATURES)
    if "avx512bw" in removed:
        removed.add("vnni")
    if "amx" in removed:
        removed |= {"amx_int8", "amx_bf16"}
    return replace(host, **{n: False for n in removed},
                   source=f"{host.source}, minus {','.join(sorted(removed))} (forced)")


@contextlib.contextmanager
def forced(**features: bool):
    """Remove features for the duration (``forced(vnni=False, bf16=False)``); only
    ``False`` is accepted."""
    bad = [k for k in features if k not in FEATURES]
    if bad:
        raise ValueError(f"unknown feature(s) {bad}; known: {sorted(FEATURES)}")
    if any(v is not False for v in features.values()):
        raise ValueError("forced() can only remove features (name=False)")
    _FORCED.append(set(features))
    try:
        yield detect()
    finally:
        _FORCED.pop()


def llvm_features() -> dict[str, bool]:
    """The feature map numba compiles for (LLVM names: ``avx512f``, ``amx-int8``, ...)."""
    return dict(_llvm_features())


#: Our names of the extensions a description of the machine lists -> LLVM feature names.
EXTENSIONS = {"AVX-512": "avx512f", "VNNI": "avx512vnni", "BF16": "avx512bf16",
              "FP16": "avx512fp16", "AMX-INT8": "amx-int8", "AMX-BF16": "amx-bf16"}


def extensions() -> list[str]:
    """The vector and matrix extensions numba may compile for here, by our names."""
    features = _llvm_features()
    return [name for name, flag in EXTENSIONS.items() if features.get(flag)]


#: ``arch_prctl`` codes: the syscall, "request permission", and the tile-data feature bit.
_ARCH_PRCTL, _REQ_XCOMP_PERM, _GET_XCOMP_PERM, _XTILEDATA = 158, 0x1023, 0x1022, 18
_PERMISSION: dict[int, str | None] = {}


def amx_permission() -> str | None:
    """Ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``), once per process (the answer is kept per process id, so a
    forked child asks again); None when granted, else why not. Process-wide: it covers
    every thread. Without it the first tile instruction raises SIGILL."""
    import ctypes
    import sys

    pid = os.getpid()
    if pid in _PERMISSION:
        return _PERMISSION[pid]
    why = None
    if not sys.platform.startswith("linux"):
        why = "AMX needs Linux's arch_prctl permission for the tile state"
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        r = libc.syscall(ctypes.c_long(_ARCH_PRCTL), ctypes.c_long(_REQ_XCOMP_PERM),
                         ctypes.c_long(_XTILEDATA))
        perm = ctypes.c_uint64(0)
        if r != 0:
            why = (f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: "
                   f"{os.strerror(ctypes.get_errno())} (kernel too old or AMX disabled)")
        elif (libc.syscall(ctypes.c_long(_ARCH_PRCTL), ctypes.c_long(_GET_XCOMP_PERM),
                           ctypes.byref(perm)) != 0 or not (perm.value >> _XTILEDATA) & 1):
            why = f"the tile-data permission bit is not set after the request ({perm.value:#x})"
    _PERMISSION[pid] = why
    return why


def amx_unavailable() -> str | None:
    """Why the AMX kernels cannot run here (None if they can): a missing feature (removed
    ones included), or the permission refused. Asks for the permission only when the
    features are there."""
    f = detect()
    if not f.amx_path:
        missing = [n for n in ("amx", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "bf16")
                   if not getattr(f, n)]
        return f"no AMX path: this CPU lacks {', '.join(missing)} [{f.source}]"
    why = amx_permission()
    return None if why is None else f"AMX present but unusable: {why}"
