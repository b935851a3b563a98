"""The tuning file's reader: which block sizes the autotuner stored for this machine.

Below the API (``docs/ARCHITECTURE.md``): :func:`fa_lab.api.plan` and ``kernel="auto"``
read it; the writer, :func:`fa_lab.tools.tune.autotune`, is a tool above.

The file is ``$FA_LAB_TUNE_FILE`` or ``~/.cache/fa_lab/tuned.json``. A choice made on
another machine (CPU, thread count, BLAS kernels, numba version) is ignored, not
reused: :func:`tuned_blocks` compares the fingerprint.

The file is validated when read (:func:`validate`): a JSON object with a
``fingerprint`` object, ``choices`` ``{kernel: {regime: {block_q, block_kv, ...}}}``
with block sizes ints in ``1 ..`` :data:`MAX_BLOCK`, optional ``sweeps`` of the same
kind with finite, positive ``median_s``, and optional measured ``paths`` (below). A file that fails (bad JSON, a list, a negative
or huge block, a string where a number belongs) is ignored as a whole with **one**
:class:`TuningFileWarning` naming the file and the first problem; the kernels' default
blocks are then used, exactly as without a file.

**Measured paths** (``paths``, written by :func:`fa_lab.tools.tune.tune_paths`): where a
call has several ways to run, the tuner times each on a representative shape and
stores them all, ``{name: {"shape": str, "candidates": [{"label": str, "median_s": s,
"q25_s": s, "q75_s": s, ...options}]}}``. ``kernel="auto"`` then runs the fastest
candidate that serves the call (:func:`measured_choice`), for calls like the measured
one (a decode step: one query row; key splits only for a similar number of heads,
:func:`alike`), and the plans say which and why (:func:`measured_reason`). :data:`PATHS`
names the entries and their shapes; a candidate missing a field its entry needs makes
the file invalid (one warning, the rules).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from fa_lab.settings import config
from fa_lab.settings.config import num_threads
from fa_lab.settings.machine import machine

#: Largest block size accepted from a tuning file (rows of Q or K per tile).
MAX_BLOCK = 1 << 16


class TuningFileWarning(UserWarning):
    """The tuning file is malformed and was ignored (defaults are used)."""


@dataclass(frozen=True)
class Regime:
    """A class of calls that share a block-size choice, with the shape it is tuned on."""

    name: str
    max_Nq: int | None  # calls with Nq <= max_Nq (None: no limit) fall in this regime
    B: int
    H: int
    Nq: int
    Nk: int
    d: int
    causal: bool | str
    blocks_q: tuple
    blocks_kv: tuple
    summary: str


#: Regimes in the order they are matched (first whose ``max_Nq`` admits the call).
#: The grids stay short (the sweep runs in the report): Br, Bc around what BLAS needs.
REGIMES = (
    Regime("decode", 16, 1, 8, 1, 4096, 64, "bottom_right", (1,), (128, 256, 512, 1024),
           "one or a few new tokens against a long KV cache (latency)"),
    Regime("short", 1024, 1, 8, 512, 512, 64, False, (64, 128, 256), (128, 256, 512),
           "prompts up to 1024 tokens"),
    Regime("long", None, 1, 8, 2048, 2048, 64, False, (128, 256, 512), (128, 256, 512),
           "long prefill (throughput)"),
)

#: Measured paths: ``name -> (what is chosen, the representative shape)``. Decode is
#: measured twice, each kv head serving one query head (MHA) or four (GQA), because
#: sharing a cached row across a group changes which kernel is fastest.
PATHS = {
    "decode_mha": ("decode kernel and key splits", dict(B=1, H=8, H_kv=8, Nq=1, Nk=4096, d=64)),
    "decode_gqa": ("decode kernel and key splits", dict(B=1, H=32, H_kv=8, Nq=1, Nk=4096, d=64)),
    "int8_pv": ("INT8 kernel and P V precision allowed by pv_dtype='bfloat16'",
                dict(B=1, H=8, H_kv=8, Nq=1024, Nk=1024, d=64)),
    "decode_bf16": ("bfloat16 decode: the bf16 kernels (AMX tiles) or float32",
                    dict(B=1, H=8, H_kv=8, Nq=1, Nk=4096, d=64)),
    "flash_pv": ("flash's P V product: BLAS or fa_lab's float32 micro-kernel",
                 dict(B=1, H=8, H_kv=8, Nq=2048, Nk=2048, d=64)),
}


def decode_path(H: int, H_kv: int) -> str:
    """The measured decode entry a call with these heads reads (MHA or grouped)."""
    return "decode_mha" if H == H_kv else "decode_gqa"


def tune_path() -> Path:
    """Where tuned choices are stored (``$FA_LAB_TUNE_FILE`` or the user's cache)."""
    key = (os.environ.get("FA_LAB_TUNE_FILE"), os.environ.get("XDG_CACHE_HOME"),
           os.environ.get("HOME"))
    if key not in _PATHS:  # resolved once per environment: attention() asks every call
        env, cache, _ = key
        _PATHS[key] = Path(env) if env else (
            Path(cache or Path.home() / ".cache") / "fa_lab" / "tuned.json")
    return _PATHS[key]


_PATHS: dict = {}


def fingerprint() -> dict:
    """What must match for a stored choice to apply: CPU, threads, BLAS kernels, numba."""
    m = machine()
    return {k: m[k] for k in ("cpu", "cores", "numba_threads", "simd", "numba", "blas")}


def regime_for(Nq: int) -> Regime:
    for r in REGIMES:
        if r.max_Nq is None or Nq <= r.max_Nq:
            return r
    return REGIMES[-1]


_CACHE: dict = {}


def _block_problem(where, entry) -> str | None:
    if not isinstance(entry, dict):
        return f"{where} must be an object, got {type(entry).__name__}"
    for key in ("block_q", "block_kv"):
        b = entry.get(key)
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            return f"{where}.{key} must be an int, got {b!r}"
        if not 1 <= b <= MAX_BLOCK:
            return f"{where}.{key} must be in 1..{MAX_BLOCK}, got {b}"
    if "median_s" in entry or where.startswith("sweeps"):
        t = entry.get("median_s")
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (
                math.isfinite(t) and t > 0):
            return f"{where}.median_s must be a positive number, got {t!r}"
    return None


def validate(data) -> str | None:
    """The first problem of a parsed tuning file (a sentence), or None if it is valid."""
    if not isinstance(data, dict):
        return f"the file must hold a JSON object, got {type(data).__name__}"
    if not isinstance(data.get("fingerprint"), dict):
        return "'fingerprint' must be an object"
    for section in ("choices", "sweeps"):
        tables = data.get(section, {})
        if not isinstance(tables, dict):
            return f"'{section}' must be an object"
        for kernel, regimes in tables.items():
            if not isinstance(regimes, dict):
                return f"{section}.{kernel} must be an object"
            for regime, entry in regimes.items():
                where = f"{section}.{kernel}.{regime}"
                entries = entry if section == "sweeps" else [entry]
                if not isinstance(entries, list):
                    return f"{where} must be a list"
                for e in entries:
                    problem = _block_problem(where, e)
                    if problem:
                        return problem
    return _paths_problem(data.get("paths", {}))


#: What each measured entry's candidates must hold besides a label and three times
#: (key -> allowed values, or a type): the readers index these keys directly.
_FIELDS = {"decode_mha": {"api": ("attention", "kvcache"), "kernel": str, "splits": int},
           "decode_gqa": {"api": ("attention", "kvcache"), "kernel": str, "splits": int},
           "int8_pv": {"kernel": str, "pv_dtype": ("float32", "bfloat16")},
           "decode_bf16": {"kernel": str},
           "flash_pv": {"kernel": str, "pv": config.FLASH_PV_PATHS}}


def _candidate_problem(where, c, fields) -> str | None:
    if not isinstance(c, dict) or not isinstance(c.get("label"), str):
        return f"{where}: every candidate must be an object with a 'label'"
    for key in ("median_s", "q25_s", "q75_s"):
        t = c.get(key)
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (
                math.isfinite(t) and t > 0):
            return f"{where}.{c['label']}.{key} must be a positive number, got {t!r}"
    for key, allowed in fields.items():
        x = c.get(key)
        if allowed is int:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not (
                    1 <= x <= MAX_BLOCK):
                return f"{where}.{c['label']}.{key} must be an int in 1..{MAX_BLOCK}, got {x!r}"
        elif not (isinstance(x, str) and (allowed is str or x in allowed)):
            want = "a string" if allowed is str else f"one of {list(allowed)}"
            return f"{where}.{c['label']}.{key} must be {want}, got {x!r}"
    return None


def _paths_problem(paths) -> str | None:
    if not isinstance(paths, dict):
        return "'paths' must be an object"
    for name, entry in paths.items():
        cands = entry.get("candidates") if isinstance(entry, dict) else None
        if not isinstance(cands, list) or not cands:
            return f"paths.{name}.candidates must be a non-empty list"
        for c in cands:
            problem = _candidate_problem(f"paths.{name}", c, _FIELDS.get(name, {}))
            if problem:
                return problem
    return None


def load(path=None) -> dict | None:
    """The stored tuning file, validated (``None`` if absent, unreadable or invalid;
    an unreadable or invalid file gives one :class:`TuningFileWarning`)."""
    target = Path(path) if path else tune_path()
    try:
        stamp = target.stat().st_mtime_ns
    except OSError:
        return None
    key = (str(target), stamp)
    if key not in _CACHE:
        _CACHE.clear()
        try:
            data = json.loads(target.read_text())
            problem = validate(data)
        except (OSError, UnicodeDecodeError) as e:
            data, problem = None, f"unreadable ({e})"
        except ValueError as e:  # JSON syntax, or numbers Python cannot hold
            data, problem = None, f"not valid JSON ({e})"
        if problem:
            warnings.warn(f"ignoring the tuning file {target}: {problem}; using the default "
                          f"block sizes (re-run python -m fa_lab tune, or delete the file)",
                          TuningFileWarning, stacklevel=3)
            data = None
        _CACHE[key] = data
    return _CACHE[key]


def tuned_blocks(kernel: str, Nq: int) -> tuple[int, int] | None:
    """The stored ``(block_q, block_kv)`` for ``kernel`` in ``Nq``'s regime, if tuned
    on this machine; else ``None``."""
    stored = load()
    if not stored or stored.get("fingerprint") != _fingerprint_cached():
        return None
    choice = stored.get("choices", {}).get(kernel, {}).get(regime_for(Nq).name)
    if not choice:
        return None
    return int(choice["block_q"]), int(choice["block_kv"])  # validated by load()


def measured(name: str) -> dict | None:
    """The stored measurement ``name`` of :data:`PATHS`, if made on this machine."""
    stored = load()
    if not stored or stored.get("fingerprint") != _fingerprint_cached():
        return None
    return stored.get("paths", {}).get(name)


def measured_choice(name: str, serves=None, **match) -> dict | None:
    """The fastest stored candidate of ``name`` whose options equal ``match`` (e.g.
    ``api="attention"``) and that ``serves(candidate)`` says can run this call, or None
    when nothing fitting was measured on this machine."""
    fits = _fitting(name, serves, match)
    return fits[0] if fits else None


def _fitting(name, serves, match) -> list:
    entry = measured(name)
    fits = [c for c in (entry or {}).get("candidates", [])
            if all(c.get(k) == v for k, v in match.items()) and (serves is None or serves(c))]
    return sorted(fits, key=lambda c: c["median_s"])


def measured_reason(name: str, chosen: dict, serves=None, **match) -> str:
    """Why ``chosen`` (a sentence with the measured medians of it and the runner-up
    among the candidates that fit, as :func:`measured_choice` filters them)."""
    others = [c for c in _fitting(name, serves, match) if c["label"] != chosen["label"]]
    text = (f"measured on this machine ({(measured(name) or {}).get('shape', '?')}): "
            f"{chosen['label']} {chosen['median_s'] * 1e3:.3g} ms")
    if others:
        text += f", next {others[0]['label']} {others[0]['median_s'] * 1e3:.3g} ms"
    return text


def alike(name: str, B: int, H: int, Nq: int) -> bool:
    """Whether a call is like the measured decode step: one query row (``Nq`` = 1) and
    ``B * H`` query heads within a factor of 2 of the measured shape's (key splits
    measured there keep the threads as busy here)."""
    shape = PATHS[name][1]
    return Nq == shape["Nq"] and shape["B"] * shape["H"] / 2 <= B * H <= 2 * shape["B"] * shape["H"]


def measured_bf16_tiles(Nq: int) -> tuple | None:
    """``(use the bf16 kernels?, why)`` measured here for a bfloat16 decode step (one query
    row, as measured), or None when not measured on this machine or not such a call."""
    best = measured_choice("decode_bf16") if Nq == PATHS["decode_bf16"][1]["Nq"] else None
    return (best["kernel"] != "float32", measured_reason("decode_bf16", best)) if best else None


def measured_splits(B: int, H: int, H_kv: int, Nq: int, Nk: int, block_kv: int) -> tuple | None:
    """``(splits, why)`` measured fastest here for ``flash`` decoding a call :func:`alike`
    the measured one, at most one split per key block of ``block_kv``; or None."""
    path = decode_path(H, H_kv)
    if not alike(path, B, H, Nq):
        return None
    best = measured_choice(path, api="attention")
    if not best:
        return None
    return (min(best["splits"], max(1, -(-Nk // block_kv))),
            measured_reason(path, best, api="attention"))


def measured_pv(Nq: int, d: int, float32: bool) -> tuple | None:
    """``(pv, why)``: the ``P V`` path of ``flash`` measured fastest here, for a prefill
    call (more query rows than the decode regime) in float32 with ``d`` a multiple of
    :data:`~fa_lab.settings.config.FLASH_PV_CHANNELS` (the calls the micro-kernel can
    serve); or None (then BLAS, the default)."""
    if Nq <= REGIMES[0].max_Nq or not float32 or d % config.FLASH_PV_CHANNELS:
        return None
    best = measured_choice("flash_pv")
    return (best["pv"], measured_reason("flash_pv", best)) if best else None


_FP: list = []


def _fingerprint_cached() -> dict:
    """:func:`fingerprint` once per process (it queries threadpoolctl)."""
    if not _FP or _FP[0][0] != num_threads():
        _FP[:] = [(num_threads(), fingerprint())]
    return _FP[0][1]


def choices_table(path=None):
    """The stored choices as a DataFrame (one row per kernel and regime)."""
    import pandas as pd

    stored = load(path) or {}
    rows = [{"kernel": k, "regime": r, **c} for k, regs in stored.get("choices", {}).items()
            for r, c in regs.items()]
    return pd.DataFrame(rows)


def reset_cache() -> None:
    _CACHE.clear()
    _FP.clear()


def write(data: dict, path=None) -> Path:
    """Store ``data`` (validated first) atomically at ``path`` or :func:`tune_path`."""
    problem = validate(data)
    if problem:
        raise ValueError(f"data: not a valid tuning file: {problem}")
    target = Path(path) if path else tune_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(target)
    _CACHE.clear()
    return target


__all__ = ["PATHS", "decode_path", "measured", "measured_choice", "measured_reason",
           "measured_splits", "measured_bf16_tiles", "measured_pv", "alike",
           "REGIMES", "Regime", "tuned_blocks", "tune_path", "fingerprint", "choices_table",
           "regime_for", "load", "validate", "write", "TuningFileWarning", "MAX_BLOCK"]
