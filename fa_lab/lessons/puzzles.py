"""Checked puzzles, in the style of the GPU puzzles: a statement, a stub, a budget, a check.

Each :class:`Puzzle` states what to write and a **budget** (one pass over K, no
``N x N`` array, ...). :func:`check` runs the learner's function on awkward shapes
(N = 1, N not a multiple of a block, prime N, ``Nq != Nk``, odd d, fully masked rows
where they can occur) against :mod:`fa_lab.numerics.reference`, and enforces the budget:

* **one pass**: the arrays are handed over as :class:`CountingArray` wrappers that count
  every row read (reading the whole array at once is refused);
* **no N x N array**: the call's peak extra memory is measured with
  :func:`fa_lab.tools.memory.measure` (memray) at a size where an ``N x N`` array is large.

A lesson shows a puzzle with :func:`show` and, to demonstrate the check, runs it on
:func:`attempt`: a plausible but wrong first try. Learners write their own function in
a new cell and pass it to :func:`check`. Reference solutions are not in the package:
they live in ``tests/test_puzzles.py``, which proves every check accepts a correct
answer and rejects a wrong one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fa_lab.numerics import reference, tiling
from fa_lab.tools import traffic
from fa_lab.tools.memory import measure


class CountingArray:
    """A read-only array that counts how often each row (or element, in 1-D) is read.

    Index it (``a[j]``, ``a[j0:j1]``) or iterate over it; ``np.asarray(a)`` is refused,
    so every read is counted. ``reads`` holds the counts per row.
    """

    def __init__(self, data):
        self._data = np.asarray(data)
        self._data.flags.writeable = False
        self.reads = np.zeros(len(self._data), dtype=np.int64)

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)

    def __len__(self):
        return len(self._data)

    def __getitem__(self, idx):
        first = idx[0] if isinstance(idx, tuple) else idx
        if isinstance(first, (int, np.integer)):
            self.reads[first] += 1
        elif isinstance(first, slice):
            self.reads[first] += 1
        else:
            raise TypeError("index a CountingArray with an int or a slice of rows")
        return self._data[idx]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, *a, **k):
        raise TypeError("this puzzle counts reads: read the array row by row (a[j]) or by "
                        "blocks of rows (a[j0:j1]), not all at once")


@dataclass
class Result:
    """What :func:`check` found: ``ok`` and, if not, why (first failures)."""

    puzzle: str
    ok: bool
    cases: int
    failures: list = field(default_factory=list)

    def __str__(self):
        if self.ok:
            return f"puzzle {self.puzzle}: passed ({self.cases} cases, budget kept)"
        return (f"puzzle {self.puzzle}: rejected ({len(self.failures)} of {self.cases} "
                "checks failed)\n  " + "\n  ".join(self.failures[:5]))

    __repr__ = __str__


@dataclass(frozen=True)
class Puzzle:
    name: str
    lesson: str
    statement: str
    stub: str
    budget: str
    run: Callable  # run(fn) -> list of (case id, failure or None)
    attempt: Callable  # a plausible wrong first try


def _close(got, want, rtol=1e-9, atol=1e-12):
    got = np.asarray(got, dtype=np.float64)
    if got.shape != np.shape(want):
        return f"shape {got.shape}, expected {np.shape(want)}"
    if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=False):
        bad = np.unravel_index(np.argmax(np.abs(np.nan_to_num(got - want, nan=np.inf))),
                               got.shape) if got.ndim else ()
        return f"wrong values (e.g. at {bad}: {got[bad]!r}, expected {np.asarray(want)[bad]!r})"
    return None


def _rng(seed):
    return np.random.default_rng(seed)


def _qkv(Nq, Nk, d, seed=0, scale=1.0):
    r = _rng(seed)
    return (r.standard_normal((Nq, d)) * scale, r.standard_normal((Nk, d)),
            r.standard_normal((Nk, d)))


def _budget(fn, args, limit, what):
    """A failure message when the call's peak extra memory exceeds ``limit`` bytes."""
    peak = measure(fn, *args).peak_bytes
    if peak > limit:
        return (f"budget: peak extra memory {peak / 2 ** 20:.2f} MiB, more than "
                f"{limit / 2 ** 20:.1f} MiB ({what})")
    return None


# --- lesson 01: online softmax --------------------------------------------------------

def _run_online_state(fn):
    out = []
    for n, kind in [(1, "normal"), (7, "normal"), (97, "large"), (13, "some -inf"),
                    (5, "all -inf")]:
        x = _rng(n).standard_normal(n) * (1e4 if kind == "large" else 1.0)
        if kind == "some -inf":
            x[::3] = -np.inf
        if kind == "all -inf":
            x[:] = -np.inf
        xs = CountingArray(x)
        case = f"len {n}, {kind}"
        try:
            m, l = fn(xs)
        except Exception as exc:  # noqa: BLE001  (a learner's error is a failed case)
            out.append((case, f"raised {exc!r}"))
            continue
        mx = x.max()
        want_l = 0.0 if mx == -np.inf else float(np.exp(x - mx).sum())
        err = None if m == mx else f"m = {m!r}, expected the max {mx!r}"
        err = err or _close(l, want_l, rtol=1e-12)
        if err is None and xs.reads.max() > 1:
            err = f"budget: one pass, but some element was read {xs.reads.max()} times"
        out.append((case, err))
    return out


def _attempt_online_state(x):
    m = max(x[j] for j in range(len(x)))  # pass 1: the max
    return m, sum(math.exp(x[j] - m) for j in range(len(x)))  # pass 2: the sum


def _run_merge(fn):
    out = []
    cases = [(0.5, 2.0, -1.0, 3.0), (1000.0, 1.0, -1000.0, 5.0), (-np.inf, 0.0, 2.0, 1.5),
             (2.0, 1.5, -np.inf, 0.0), (-np.inf, 0.0, -np.inf, 0.0)]
    for m1, l1, m2, l2 in cases:
        case = f"({m1}, {l1}) + ({m2}, {l2})"
        m = max(m1, m2)
        want = (m, 0.0 if m == -np.inf else
                l1 * math.exp(m1 - m) + l2 * math.exp(m2 - m))
        try:
            got = fn(m1, l1, m2, l2)
            err = None if got[0] == want[0] else f"m = {got[0]!r}, expected {want[0]!r}"
            out.append((case, err or _close(got[1], want[1], rtol=1e-12)))
        except Exception as exc:  # noqa: BLE001
            out.append((case, f"raised {exc!r}"))
    return out


def _attempt_merge(m1, l1, m2, l2):
    m = max(m1, m2)
    return m, l1 * math.exp(m1 - m) + l2 * math.exp(m2 - m)  # -inf - -inf = nan


# --- lesson 02: tiling ---------------------------------------------------------------

ATT_SHAPES = [(1, 1, 1, 1, 1), (37, 53, 7, 8, 16), (97, 97, 5, 32, 32), (64, 3, 4, 16, 2),
              (3, 64, 9, 2, 16)]  # (Nq, Nk, d, Br, Bc)


def _run_tiled(fn):
    out = []
    for Nq, Nk, d, Br, Bc in ATT_SHAPES:
        q, k, v = _qkv(Nq, Nk, d, seed=Nq + Nk)
        try:
            err = _close(fn(q, k, v, Br, Bc), reference.attention(q, k, v)[0])
        except Exception as exc:  # noqa: BLE001
            err = f"raised {exc!r}"
        out.append((f"Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}", err))
    q, k, v = _qkv(1024, 1024, 16, seed=1)
    out.append(("budget at N=1024", _budget(fn, (q, k, v, 64, 64), 2 * 2 ** 20,
                                              "a quarter of one N x N float64 array")))
    return out


def _attempt_tiled(q, k, v, Br, Bc):
    s = q @ k.T / math.sqrt(q.shape[1])  # the whole score matrix at once
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v


# --- lesson 03: causal masking -------------------------------------------------------

def _run_causal(fn):
    out = []
    for Nq, Nk, d, _, _ in ATT_SHAPES:
        q, k, v = _qkv(Nq, Nk, d, seed=Nq * Nk)
        for align in ("top_left", "bottom_right"):
            try:
                err = _close(fn(q, k, v, align), reference.attention(q, k, v, causal=align)[0])
            except Exception as exc:  # noqa: BLE001
                err = f"raised {exc!r}"
            out.append((f"Nq={Nq}, Nk={Nk}, d={d}, {align}", err))
    q, k, v = _qkv(1024, 1024, 16, seed=2)
    out.append(("budget at N=1024", _budget(fn, (q, k, v, "top_left"), 2 * 2 ** 20,
                                              "a quarter of one N x N float64 array")))
    return out


def _attempt_causal(q, k, v, alignment):
    Nq, Nk = q.shape[0], k.shape[0]
    off = 0 if alignment == "top_left" else Nk - Nq
    s = q @ k.T / math.sqrt(q.shape[1])
    s[np.arange(Nk)[None, :] > np.arange(Nq)[:, None] + off] = -np.inf
    p = np.exp(s - s.max(axis=1, keepdims=True))  # a fully masked row: -inf - -inf
    return (p / p.sum(axis=1, keepdims=True)) @ v


def _run_count_tiles(fn):
    out = []
    for Nq, Nk, Br, Bc in [(1, 1, 1, 1), (97, 97, 16, 16), (100, 37, 8, 5), (37, 100, 5, 8),
                           (64, 64, 64, 64), (1, 257, 1, 64), (257, 3, 16, 2)]:
        for align in ("top_left", "bottom_right"):
            c = tiling.tile_classes(Nq, Nk, Br, Bc, align)
            want = tuple(int((c == x).sum()) for x in (tiling.SKIPPED, tiling.DIAGONAL,
                                                       tiling.FULL))
            try:
                got = tuple(int(x) for x in fn(Nq, Nk, Br, Bc, align))
                err = None if got == want else f"got {got}, expected {want}"
            except Exception as exc:  # noqa: BLE001
                err = f"raised {exc!r}"
            out.append((f"Nq={Nq}, Nk={Nk}, Br={Br}, Bc={Bc}, {align}", err))
    out.append(("budget at N=4096", _budget(fn, (4096, 4096, 64, 64, "top_left"), 2 ** 20,
                                              "1/16 of an N x N bool mask")))
    return out


def _attempt_count_tiles(Nq, Nk, Br, Bc, alignment):
    off = 0 if alignment == "top_left" else Nk - Nq
    visible = np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + off  # the whole mask
    counts = [0, 0, 0]
    for i0 in range(0, Nq, Br):
        for j0 in range(0, Nk, Bc):
            tile = visible[i0:i0 + Br, j0:j0 + Bc]
            counts[0 if not tile.any() else 2 if tile.all() else 1] += 1
    return tuple(counts)


# --- lesson 07: backward -------------------------------------------------------------

def _run_softmax_backward(fn):
    out = []
    for Nq, Nk, masked in [(1, 1, False), (5, 8, True), (13, 13, False), (8, 3, False)]:
        r = _rng(Nq * 10 + Nk)
        s = r.standard_normal((Nq, Nk))
        if masked:
            s[2] = -np.inf  # a fully masked row: P = 0 there
        P, dP = reference.softmax(s), r.standard_normal((Nq, Nk))
        jac = np.einsum("ij,jk->ijk", P, np.eye(Nk)) - np.einsum("ij,ik->ijk", P, P)
        try:
            err = _close(fn(P, dP), np.einsum("ijk,ij->ik", jac, dP))
        except Exception as exc:  # noqa: BLE001
            err = f"raised {exc!r}"
        out.append((f"Nq={Nq}, Nk={Nk}{', a masked row' if masked else ''}", err))
    r = _rng(3)
    P = reference.softmax(r.standard_normal((256, 256)))
    out.append(("budget at N=256", _budget(fn, (P, r.standard_normal((256, 256))),
                                             8 * 256 ** 2 * 8, "8 N x N float64 arrays; "
                                             "the N x N x N Jacobian is 256 of them")))
    return out


def _attempt_softmax_backward(P, dP):
    return P * dP  # forgets the rowsum(P * dP) term of the Jacobian


def _run_dv(fn):
    out = []
    for Nq, Nk, d, _, _ in ATT_SHAPES:
        q, k, v = _qkv(Nq, Nk, d, seed=Nq + 2 * Nk)
        dout = _rng(d).standard_normal((Nq, d))
        _, lse = reference.attention(q, k, v)
        try:
            err = _close(fn(q, k, dout, lse), reference.attention_backward(q, k, v, dout)[2])
        except Exception as exc:  # noqa: BLE001
            err = f"raised {exc!r}"
        out.append((f"Nq={Nq}, Nk={Nk}, d={d}", err))
    return out


def _attempt_dv(q, k, dout, lse):
    P = np.exp(q @ k.T - lse[:, None])  # forgets the 1/sqrt(d) scale
    return P.T @ dout


# --- lesson 09: the memory hierarchy -------------------------------------------------

def _run_decode(fn):
    out = []
    for Nk, d, mag in [(1, 1, 1.0), (7, 5, 1.0), (97, 64, 1.0), (31, 3, 30.0)]:
        q, k, v = _qkv(1, Nk, d, seed=Nk, scale=mag)
        ks, vs = CountingArray(k), CountingArray(v)
        try:
            err = _close(fn(q[0], ks, vs), reference.attention(q, k, v)[0][0])
        except Exception as exc:  # noqa: BLE001
            err = f"raised {exc!r}"
        if err is None and (ks.reads.max() > 1 or vs.reads.max() > 1):
            err = (f"budget: one pass, but a row of K was read {ks.reads.max()} times and a "
                   f"row of V {vs.reads.max()} times")
        out.append((f"Nk={Nk}, d={d}, |q| x{mag:g}", err))
    return out


def _attempt_decode(q, k, v):
    scale = 1 / math.sqrt(len(q))
    m = max(k[j] @ q * scale for j in range(len(k)))  # pass 1 over K: the max
    p = [math.exp(k[j] @ q * scale - m) for j in range(len(k))]  # pass 2 over K
    return sum(p[j] * v[j] for j in range(len(v))) / sum(p)


def _run_kv_bytes(fn):
    out = []
    for Nq, Nk, d, Br, s in [(1, 1, 1, 1, 4), (1000, 1000, 64, 64, 4), (97, 4096, 7, 16, 8),
                             (4096, 97, 128, 256, 2)]:
        t = traffic.traffic("tiled", Nq, Nk, d, 0, itemsize=s, blocks=(Br, 8))
        want = t["K"] + t["V"]
        try:
            got = int(fn(Nq, Nk, d, Br, s))
            err = None if got == want else f"got {got}, expected {want}"
        except Exception as exc:  # noqa: BLE001
            err = f"raised {exc!r}"
        out.append((f"Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, itemsize={s}", err))
    return out


def _attempt_kv_bytes(Nq, Nk, d, Br, itemsize):
    return (Nq // Br) * 2 * Nk * d * itemsize  # forgets the last, partial query block


PUZZLES = {p.name: p for p in [
    Puzzle("online_state", "01_online_softmax",
           "Return the softmax state (m, l) of a 1-D array x: m = max(x), "
           "l = sum(exp(x - m)); all -inf gives (-inf, 0).",
           "def online_state(x):\n    \"\"\"x: 1-D array-like (read x[j]). Returns (m, l).\"\"\"\n"
           "    ...", "one pass: every element of x read once", _run_online_state,
           _attempt_online_state),
    Puzzle("merge_states", "01_online_softmax",
           "Merge two softmax states (m1, l1) and (m2, l2) of disjoint parts of a row into "
           "the state of the whole row. An empty part has state (-inf, 0).",
           "def merge_states(m1, l1, m2, l2):\n    \"\"\"Returns (m, l).\"\"\"\n    ...",
           "O(1) work, no NaN for empty parts", _run_merge, _attempt_merge),
    Puzzle("tiled_attention", "02_tiling_and_simd",
           "Attention softmax(q k^T / sqrt(d)) v of 2-D q (Nq, d), k, v (Nk, d), computed in "
           "Br x Bc tiles with the online softmax.",
           "def tiled_attention(q, k, v, Br, Bc):\n    \"\"\"Returns o (Nq, d).\"\"\"\n    ...",
           "no Nq x Nk array: peak extra memory at N=1024, d=16 under 2 MiB",
           _run_tiled, _attempt_tiled),
    Puzzle("causal_attention", "03_causal_masking",
           "Causal attention of 2-D q, k, v, alignment 'top_left' (query i sees keys j <= i) "
           "or 'bottom_right' (j <= i + Nk - Nq). A row that sees no key returns zeros.",
           "def causal_attention(q, k, v, alignment):\n    \"\"\"Returns o (Nq, d).\"\"\"\n"
           "    ...", "no Nq x Nk array: peak extra memory at N=1024, d=16 under 2 MiB",
           _run_causal, _attempt_causal),
    Puzzle("count_tiles", "03_causal_masking",
           "Count the (skipped, diagonal, full) tiles of a causal Nq x Nk problem in Br x Bc "
           "tiles (the kernels' rules: fa_lab.numerics.tiling's docstring).",
           "def count_tiles(Nq, Nk, Br, Bc, alignment):\n    \"\"\"Returns (skipped, "
           "diagonal, full).\"\"\"\n    ...",
           "no Nq x Nk mask: peak extra memory at N=4096 under 1 MiB", _run_count_tiles,
           _attempt_count_tiles),
    Puzzle("softmax_backward", "07_backward",
           "Given P = softmax(S) row-wise (Nq, Nk) and dP = dL/dP, return dS = dL/dS.",
           "def softmax_backward(P, dP):\n    \"\"\"Returns dS (Nq, Nk).\"\"\"\n    ...",
           "no N x N x N Jacobian: peak extra memory at N=256 under 8 N x N arrays",
           _run_softmax_backward, _attempt_softmax_backward),
    Puzzle("attention_dv", "07_backward",
           "dV of attention from q, k, dO and the forward's lse (natural log, of the "
           "scaled scores): recompute P = exp(q k^T / sqrt(d) - lse), then dV.",
           "def attention_dv(q, k, dout, lse):\n    \"\"\"Returns dV (Nk, d).\"\"\"\n    ...",
           "exact against the reference's backward", _run_dv, _attempt_dv),
    Puzzle("decode_step", "09_memory_hierarchy",
           "One decode step: the attention output of one query row q (d,) against K, V "
           "(Nk, d). Read each row of K and V once: a decode step is then one stream over "
           "the cache, at the bandwidth of the level that holds it.",
           "def decode_step(q, k, v):\n    \"\"\"q (d,), k, v: read rows k[j], v[j]. "
           "Returns o (d,).\"\"\"\n    ...",
           "one pass: every row of K and of V read once", _run_decode, _attempt_decode),
    Puzzle("kv_bytes", "09_memory_hierarchy",
           "Bytes of K and V that FlashAttention-2's loop order (query blocks of Br rows "
           "outside) reads from slow memory when one head's K and V do not fit in fast "
           "memory.", "def kv_bytes(Nq, Nk, d, Br, itemsize):\n    \"\"\"Returns an int."
           "\"\"\"\n    ...", "exact (fa_lab.tools.traffic's model)", _run_kv_bytes,
           _attempt_kv_bytes),
]}


def _get(name) -> Puzzle:
    if name not in PUZZLES:
        raise ValueError(f"puzzle must be one of {sorted(PUZZLES)}, got {name!r}")
    return PUZZLES[name]


def check(name: str, fn) -> Result:
    """Run puzzle ``name``'s checks on ``fn``: awkward shapes, then the budget."""
    found = _get(name).run(fn)
    failures = [f"{case}: {err}" for case, err in found if err]
    return Result(name, not failures, len(found), failures)


def show(name: str) -> None:
    """Print the puzzle's statement, budget and stub."""
    p = _get(name)
    print(f"puzzle {p.name} (lesson {p.lesson})\n{p.statement}\nbudget: {p.budget}\n\n{p.stub}")


def attempt(name: str):
    """A plausible but wrong first try at puzzle ``name`` (to see the check reject it)."""
    return _get(name).attempt


def for_lesson(lesson: str) -> list[str]:
    """The names of the puzzles of one lesson."""
    return [p.name for p in PUZZLES.values() if p.lesson == lesson]


__all__ = ["PUZZLES", "Puzzle", "Result", "CountingArray", "check", "show", "attempt",
           "for_lesson"]
