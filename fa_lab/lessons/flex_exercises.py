"""Lesson 15's checked exercises: the learner writes a ``score_mod`` or ``mask_mod``;
:func:`check` runs it through ``fa_lab.flex_attention`` and says what is wrong (where
the first wrong element is and what it should be), not only pass or fail. The solutions
live in the tests."""

from __future__ import annotations

import math

import numpy as np

from fa_lab.features.flex import flex_attention
from fa_lab.numerics.flex import create_block_mask, reference_flex_attention

#: name -> (task, arity, the expected function (the same as the solution's), hint)
EXERCISES = {
    "t5_bias": ("score_mod: add a bias of -0.1 per token of distance, but only for keys "
                "in the past (kv_idx <= q_idx); keys in the future keep their score", 5,
                lambda s, b, h, i, j: s - 0.1 * (i - j) if j <= i else s,
                "compare kv_idx with q_idx first; the distance is q_idx - kv_idx"),
    "chunked_causal": ("mask_mod: causal within chunks of 8 tokens (Llama-4's chunked "
                       "attention): q attends to kv when both are in the same chunk of 8 "
                       "and kv_idx <= q_idx", 4,
                       lambda b, h, i, j: i // 8 == j // 8 and j <= i,
                       "the chunk of a position p is p // 8"),
    "tanh_softcap": ("score_mod: Gemma-2's softcap with a cap of 5: 5 * tanh(score / 5)", 5,
                     lambda s, b, h, i, j: 5.0 * math.tanh(s / 5.0),
                     "math.tanh works inside a compiled function"),
}


def show(name: str) -> None:
    task, arity, _, hint = EXERCISES[name]
    print(f"exercise {name!r}: {task}\n  hint: {hint}")


def check(name: str, fn) -> str:
    """Run ``fn`` against the expected function on a small problem; a sentence."""
    if name not in EXERCISES:
        raise ValueError(f"name must be one of {sorted(EXERCISES)}, got {name!r}")
    _, arity, expected, hint = EXERCISES[name]
    N = 37
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, N, 8)) for _ in range(3))
    try:
        if arity == 5:
            got = flex_attention(q, k, v, score_mod=fn)
            want = reference_flex_attention(q, k, v, expected)[0]
            probe = [(i, j) for i in (3, 20) for j in (0, 3, 20, 30)]
            for i, j in probe:
                a, e = fn(0.7, 0, 0, i, j), expected(0.7, 0, 0, i, j)
                if not math.isclose(a, e, rel_tol=1e-9, abs_tol=1e-12):
                    return (f"not yet: for score 0.7 at q_idx={i}, kv_idx={j} your function "
                            f"returns {a:.4f}, expected {e:.4f} (hint: {hint})")
        else:
            bm = create_block_mask(fn, None, None, N, N, BLOCK_SIZE=8)
            got = flex_attention(q, k, v, block_mask=bm)
            want = reference_flex_attention(q, k, v, None, expected)[0]
            for i in range(N):
                for j in range(N):
                    if bool(fn(0, 0, i, j)) != expected(0, 0, i, j):
                        return (f"not yet: at q_idx={i}, kv_idx={j} your mask says "
                                f"{bool(fn(0, 0, i, j))}, expected {expected(0, 0, i, j)} "
                                f"(hint: {hint})")
    except TypeError as exc:
        return f"not yet: {exc}"
    if not np.allclose(got, want, atol=1e-10):
        return "not yet: the attention output differs from the expected one"
    return f"correct: {name} matches, element by element and through flex_attention"


__all__ = ["EXERCISES", "show", "check"]
