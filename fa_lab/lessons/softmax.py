"""Online softmax, step by step (lesson 01): from three passes to one, and the merge.

These are teaching versions in NumPy, written loop-by-loop to show the passes, for
one row of scores ``s`` (length N) and values ``V`` (N, d). The kernels in
:mod:`fa_lab.kernels` implement the same recurrences in Numba.

* :func:`softmax_3pass` -- safe softmax: max, then sum of ``exp(s - m)``, then divide.
* :func:`softmax_2pass` -- online normalizer (Milakov & Gimelshein 2018): the max and
  the sum in one pass, rescaling the sum when the max grows; a second pass divides.
* :func:`attention_1pass` -- the normalizer fused with ``P V``: one pass, state
  ``(m, l, acc)``, divided once at the end (FlashAttention's inner loop).
* :class:`State` and :func:`merge` -- two partial states over disjoint key sets combine
  into the state over their union. ``merge`` is associative and commutative (up to
  rounding), which is why keys can be processed in blocks, in any grouping, on any
  number of threads (split-KV decoding merges per-thread states this way).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def softmax_3pass(s) -> np.ndarray:
    """Safe softmax of one row: pass 1 max, pass 2 sum, pass 3 normalize."""
    s = np.asarray(s, dtype=np.float64)
    m = -np.inf
    for x in s:  # pass 1
        m = max(m, x)
    l = 0.0
    for x in s:  # pass 2
        l += np.exp(x - m)
    return np.array([np.exp(x - m) / l for x in s])  # pass 3


def softmax_2pass(s, history=False):
    """Online normalizer: ``m`` and ``l`` in one pass, then normalize.

    With ``history=True`` also returns the running ``m`` and ``l`` after each element.
    """
    s = np.asarray(s, dtype=np.float64)
    m, l = -np.inf, 0.0
    ms, ls = [], []
    for x in s:  # pass 1: when the max grows, rescale the old sum by exp(m_old - m_new)
        m_new = max(m, x)
        l = l * np.exp(m - m_new) + np.exp(x - m_new)
        m = m_new
        ms.append(m)
        ls.append(l)
    p = np.exp(s - m) / l  # pass 2
    return (p, np.array(ms), np.array(ls)) if history else p


class State(NamedTuple):
    """Partial softmax-attention state over a set of keys.

    m: running max of the scores; l: sum of ``exp(s - m)``; acc: ``sum exp(s - m) v``
    (un-normalized output, length d).
    """

    m: float
    l: float
    acc: np.ndarray

    @classmethod
    def empty(cls, d: int) -> "State":
        return cls(-np.inf, 0.0, np.zeros(d))

    def output(self) -> np.ndarray:
        """``O = acc / l`` (zeros for a state that saw no key)."""
        return np.zeros_like(self.acc) if self.l == 0 else self.acc / self.l

    def lse(self) -> float:
        """``m + log(l)``, the log of the softmax denominator."""
        return -np.inf if self.l == 0 else self.m + np.log(self.l)


def state_of(s, V) -> State:
    """The state of a block of scores ``s`` (n,) and values ``V`` (n, d), directly."""
    s = np.asarray(s, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    if s.size == 0:
        return State.empty(V.shape[1])
    m = s.max()
    p = np.exp(s - m)
    return State(m, p.sum(), p @ V)


def merge(a: State, b: State) -> State:
    """Combine the states of two disjoint key sets: rescale both to the larger max."""
    m = max(a.m, b.m)
    if m == -np.inf:
        return State(m, 0.0, a.acc + b.acc)
    alpha, beta = np.exp(a.m - m), np.exp(b.m - m)
    return State(m, alpha * a.l + beta * b.l, alpha * a.acc + beta * b.acc)


def attention_1pass(s, V, block: int = 1, history=False):
    """One pass over keys in blocks of ``block``: fold each block's state with ``merge``.

    Returns ``O`` (d,), or ``(O, m_history, l_history)`` with the state after each block.
    """
    V = np.asarray(V, dtype=np.float64)
    state = State.empty(V.shape[1])
    ms, ls = [], []
    for j0 in range(0, len(s), block):
        state = merge(state, state_of(s[j0:j0 + block], V[j0:j0 + block]))
        ms.append(state.m)
        ls.append(state.l)
    out = state.output()
    return (out, np.array(ms), np.array(ls)) if history else out


def merge_partition(s, V, cuts) -> State:
    """Split the keys at ``cuts``, make a state per part, merge them in a random tree.

    The result equals :func:`state_of` of the whole row up to rounding, for any cuts and
    any merge order: the lesson's demonstration of associativity.
    """
    parts = np.split(np.arange(len(s)), np.sort(np.asarray(cuts, dtype=int)))
    states = [state_of(s[p], V[p]) for p in parts]
    rng = np.random.default_rng(len(states))
    while len(states) > 1:  # merge a random adjacent pair until one is left
        i = int(rng.integers(len(states) - 1))
        states[i:i + 2] = [merge(states[i], states[i + 1])]
    return states[0]


def naive_exp_sum(s, dtype=np.float32):
    """``sum(exp(s))`` without subtracting the max, in ``dtype``: overflows for s > ~88."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(np.asarray(s, dtype=dtype))
        return e / e.sum()
