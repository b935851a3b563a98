"""The machinery of the checked exercises (:mod:`.exercises`): an exercise (a task, a
hint, the expected answer computed by the library, the mistakes it recognises) and the
judgement of an answer: right, not yet answered, or what it most likely missed."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Exercise:
    """A question (``task``), a ``hint``, the expected answer computed by the library
    (``expected()``: a number or a tuple of numbers) and the mistakes it recognises:
    ``mistakes(answer, want) -> str | None`` (a reading of a wrong answer)."""

    lesson: str
    task: str
    hint: str
    expected: Callable
    mistakes: Callable = field(default=lambda answer, want: None)
    rtol: float = 0.01


def close(a, b, rtol):
    """Whether ``a`` is within the relative tolerance ``rtol`` of ``b``."""
    return abs(a - b) <= rtol * max(abs(b), 1e-12)


def factor_of(answer, want, readings: dict, rtol=0.01):
    """The reading whose factor times ``want`` is ``answer`` (None if none)."""
    for factor, why in readings.items():
        if want != 0 and close(answer, want * factor, rtol):
            return why
    return None


def _number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def judge(e: Exercise, answer) -> str:
    """A sentence: right, not yet answered (``None``), or what the answer misses."""
    if answer is None:
        return "not yet: replace None with your answer"
    want = e.expected()
    if isinstance(want, tuple):
        try:
            got = tuple(answer)
        except TypeError:
            got = None
        if got is None or len(got) != len(want) or not all(_number(a) for a in got):
            return f"not yet: answer {len(want)} numbers in a tuple, got {answer!r}"
        if all(close(a, w, e.rtol) if e.rtol else a == w for a, w in zip(got, want)):
            return f"right: {want}"
        why = e.mistakes(got, want)
        return f"not yet: {why}" if why else f"not yet: {got} is not {len(want)} right numbers"
    if not _number(answer):
        return f"not yet: answer a number, got {answer!r}"
    if close(answer, want, e.rtol):
        return f"right: {want:.6g}"
    why = e.mistakes(answer, want)
    return (f"not yet: {why}" if why else
            f"not yet: {answer!r} is off by a factor {answer / want:.3g}" if want else
            f"not yet: {answer!r} is not the answer")
