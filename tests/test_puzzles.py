"""The puzzles' checks: each accepts a reference solution (kept here, not in the package
or the notebooks) and rejects plausible wrong answers (the package's own first try, and
more below)."""

import math

import numpy as np
import pytest

from fa_lab.lessons import puzzles

# --- reference solutions -------------------------------------------------------------


def online_state(x):
    m, l = -np.inf, 0.0
    for j in range(len(x)):
        xj = x[j]
        if xj == -np.inf:
            continue
        if xj > m:
            l, m = l * math.exp(m - xj) + 1.0, xj
        else:
            l += math.exp(xj - m)
    return m, l


def merge_states(m1, l1, m2, l2):
    m = max(m1, m2)
    if m == -np.inf:
        return m, 0.0
    return m, l1 * math.exp(m1 - m) + l2 * math.exp(m2 - m)


def _blocks_attention(q, k, v, Br, Bc, offset=None):
    """Online softmax over Br x Bc tiles; ``offset`` set = causal (j <= i + offset)."""
    Nq, d = q.shape
    Nk = k.shape[0]
    o = np.zeros((Nq, d))
    for i0 in range(0, Nq, Br):
        qi = q[i0:i0 + Br] / math.sqrt(d)
        br = qi.shape[0]
        m, l, acc = np.full(br, -np.inf), np.zeros(br), np.zeros((br, d))
        for j0 in range(0, Nk, Bc):
            s = qi @ k[j0:j0 + Bc].T
            if offset is not None:
                hidden = (np.arange(j0, j0 + s.shape[1])[None, :]
                          > np.arange(i0, i0 + br)[:, None] + offset)
                s[hidden] = -np.inf
            m_new = np.maximum(m, s.max(axis=1))
            m_use = np.where(np.isneginf(m_new), 0.0, m_new)
            p = np.exp(s - m_use[:, None])
            alpha = np.exp(m - m_use)
            l = alpha * l + p.sum(axis=1)
            acc = alpha[:, None] * acc + p @ v[j0:j0 + Bc]
            m = m_new
        seen = l > 0
        o[i0:i0 + br][seen] = acc[seen] / l[seen, None]
    return o


def tiled_attention(q, k, v, Br, Bc):
    return _blocks_attention(q, k, v, Br, Bc)


def causal_attention(q, k, v, alignment):
    off = 0 if alignment == "top_left" else k.shape[0] - q.shape[0]
    return _blocks_attention(q, k, v, 64, 64, offset=off)


def count_tiles(Nq, Nk, Br, Bc, alignment):
    off = 0 if alignment == "top_left" else Nk - Nq
    counts = [0, 0, 0]
    for i0 in range(0, Nq, Br):
        i1 = min(i0 + Br, Nq)
        for j0 in range(0, Nk, Bc):
            j1 = min(j0 + Bc, Nk)
            counts[0 if j0 > i1 - 1 + off else 1 if j1 - 1 > i0 + off else 2] += 1
    return tuple(counts)


def softmax_backward(P, dP):
    return P * (dP - (P * dP).sum(axis=1, keepdims=True))


def attention_dv(q, k, dout, lse):
    P = np.exp(q @ k.T / math.sqrt(q.shape[1]) - lse[:, None])
    return P.T @ dout


def decode_step(q, k, v):
    scale = 1 / math.sqrt(len(q))
    m, l, acc = -np.inf, 0.0, np.zeros(len(q))
    for j in range(len(k)):
        s = k[j] @ q * scale
        m_new = max(m, s)
        alpha, p = math.exp(m - m_new), math.exp(s - m_new)
        l = alpha * l + p
        acc = alpha * acc + p * v[j]
        m = m_new
    return acc / l


def kv_bytes(Nq, Nk, d, Br, itemsize):
    return -(-Nq // Br) * 2 * Nk * d * itemsize


SOLUTIONS = {"online_state": online_state, "merge_states": merge_states,
             "tiled_attention": tiled_attention, "causal_attention": causal_attention,
             "count_tiles": count_tiles, "softmax_backward": softmax_backward,
             "attention_dv": attention_dv, "decode_step": decode_step, "kv_bytes": kv_bytes}

# --- more wrong answers --------------------------------------------------------------

WRONG = {
    "online_state": lambda x: (max(x[j] for j in range(len(x))), 1.0),
    "merge_states": lambda m1, l1, m2, l2: (max(m1, m2), l1 + l2),
    "tiled_attention": lambda q, k, v, Br, Bc: _blocks_attention(q, k, v, Br, Bc) * 1.001,
    "causal_attention": lambda q, k, v, a: _blocks_attention(q, k, v, 64, 64, offset=0),
    "count_tiles": lambda Nq, Nk, Br, Bc, a: count_tiles(Nq, Nk, Br, Bc, "top_left"),
    "softmax_backward": lambda P, dP: P * (dP - dP.sum(axis=1, keepdims=True)),
    "attention_dv": lambda q, k, dout, lse: np.exp(
        q @ k.T / math.sqrt(q.shape[1]) - lse[:, None]) @ dout[:k.shape[0]],
    "decode_step": lambda q, k, v: decode_step(q, k, v) + 1e-6,
    "kv_bytes": lambda Nq, Nk, d, Br, s: 2 * Nq * Nk * d * s // Br,
}


def test_at_least_eight_puzzles_across_the_lessons():
    assert len(puzzles.PUZZLES) >= 8
    lessons = {p.lesson[:2] for p in puzzles.PUZZLES.values()}
    assert {"01", "02", "03", "07", "09"} <= lessons
    assert set(SOLUTIONS) == set(puzzles.PUZZLES) == set(WRONG)


@pytest.mark.parametrize("name", sorted(puzzles.PUZZLES))
def test_check_accepts_the_reference_solution(name):
    result = puzzles.check(name, SOLUTIONS[name])
    assert result.ok, str(result)
    assert result.cases >= 4


@pytest.mark.parametrize("name", sorted(puzzles.PUZZLES))
def test_check_rejects_the_packaged_first_try(name):
    result = puzzles.check(name, puzzles.attempt(name))
    assert not result.ok and result.failures, str(result)


@pytest.mark.parametrize("name", sorted(puzzles.PUZZLES))
def test_check_rejects_another_wrong_answer(name):
    assert not puzzles.check(name, WRONG[name]).ok


def test_budget_failures_are_named():
    # Correct values, over budget: the message says which budget.
    for name in ("online_state", "tiled_attention", "count_tiles", "decode_step"):
        failures = puzzles.check(name, puzzles.attempt(name)).failures
        assert any("budget" in f for f in failures), (name, failures)


def test_counting_array_counts_and_refuses_bulk_reads():
    a = puzzles.CountingArray(np.arange(12.0).reshape(4, 3))
    a[1], a[1:3], list(a)
    assert a.reads.tolist() == [1, 3, 2, 1]
    with pytest.raises(TypeError, match="row by row"):
        np.asarray(a)
    with pytest.raises(ValueError):
        a[0][0] = 1.0  # read-only


def test_a_raising_function_is_a_failed_case_not_a_crash():
    result = puzzles.check("kv_bytes", lambda *a: 1 / 0)
    assert not result.ok and "ZeroDivisionError" in result.failures[0]


def test_show_and_unknown_names(capsys):
    puzzles.show("decode_step")
    assert "def decode_step(q, k, v):" in capsys.readouterr().out
    with pytest.raises(ValueError, match="puzzle must be one of"):
        puzzles.check("nope", print)
