"""Consistency checks: numbers of one run that cannot all be right.

A budget's verdict (:mod:`fa_lab.numerics.verdict`) judges one number against a bound;
these judge numbers against *each other*, and catch a measurement that went wrong
(a noisy window, a cold cache, a stale tuning file, a wrong byte or FLOP count) before
a learner reads a conclusion off it. Each returns a
:class:`~fa_lab.numerics.verdict.Verdict`: ``agrees``, or ``suspicious`` with the
two numbers that disagree (``inconclusive`` when the timing window was busy: a busy
machine explains the disagreement, and proves nothing). A lesson shows it with
``lesson.check(...)`` like any verdict, and the report's index lists every suspicious
one.

The checks:

* :func:`fraction_of_peak`: a rate above its ceiling (more than :data:`PEAK_SLACK` of a
  measured peak: the peak or the operation count is wrong);
* :func:`above_floor`: a time below its floor (faster than the bytes it must move allow);
* :func:`same_configuration`: the same configuration measured more than
  :data:`APART` apart in two places of one report;
* :func:`baseline_beats`: a strong baseline slower than a rung it should beat;
* :func:`planner_choice`: the planner's choice beaten by an alternative in the same
  table by more than :data:`CHOICE_SLACK`.
"""

from __future__ import annotations

from fa_lab.numerics.verdict import INCONCLUSIVE, Verdict
from fa_lab.settings.machine import Load

CONSISTENT, SUSPICIOUS = "agrees", "suspicious"

#: A rate may read this far above its peak before it is suspicious (the noise of a
#: difference of two medians).
PEAK_SLACK = 1.05
#: Two measurements of one configuration further apart than this factor are suspicious.
APART = 1.30
#: The planner's choice may be this much slower than the best alternative it saw.
CHOICE_SLACK = 1.10


def _busy(what: str, load: Load | None, numbers: str) -> Verdict | None:
    if load is not None and load.busy:
        return Verdict(what, INCONCLUSIVE, f"inconclusive (machine busy: {load.reason}); "
                       f"{numbers}", True)
    return None


def _positive(name: str, x: float) -> float:
    x = float(x)
    if not (x > 0 and x < float("inf")):
        raise ValueError(f"{name}: must be a positive finite number, got {x!r}")
    return x


def _at_least_one(name: str, x: float) -> float:
    x = float(x)
    if not (x >= 1 and x < float("inf")):
        raise ValueError(f"{name}: must be a finite factor >= 1, got {x!r}")
    return x


def fraction_of_peak(what: str, rate: float, peak: float, *, unit: str = "G op/s",
                     load: Load | None = None) -> Verdict:
    """``rate`` against the measured ``peak`` of the same operations: suspicious above
    :data:`PEAK_SLACK` times the peak."""
    rate, peak = _positive("rate", rate), _positive("peak", peak)
    numbers = f"{rate:,.0f} {unit} = {rate / peak:.0%} of the {peak:,.0f} {unit} peak"
    return _busy(what, load, numbers) or (
        Verdict(what, SUSPICIOUS, f"suspicious (above its ceiling): {numbers}")
        if rate > PEAK_SLACK * peak else Verdict(what, CONSISTENT, f"agrees: {numbers}"))


def above_floor(what: str, seconds: float, floor_seconds: float, *,
                load: Load | None = None) -> Verdict:
    """A measured time against its floor (the least time the work allows, e.g. the bytes
    it must read at the measured bandwidth): suspicious below it."""
    t, floor = _positive("seconds", seconds), _positive("floor_seconds", floor_seconds)
    numbers = f"{t * 1e3:.3g} ms measured, floor {floor * 1e3:.3g} ms ({t / floor:.2f}x)"
    return _busy(what, load, numbers) or (
        Verdict(what, SUSPICIOUS, f"suspicious (below its floor): {numbers}")
        if t < floor else Verdict(what, CONSISTENT, f"agrees: {numbers}"))


def same_configuration(what: str, a: float, b: float, *, where_a: str, where_b: str,
                       apart: float = APART, load: Load | None = None) -> Verdict:
    """One configuration measured twice (``a`` at ``where_a``, ``b`` at ``where_b``, in
    seconds): suspicious when one is more than ``apart`` times the other."""
    a, b, apart = _positive("a", a), _positive("b", b), _at_least_one("apart", apart)
    factor = max(a, b) / min(a, b)
    numbers = (f"{a * 1e3:.3g} ms ({where_a}) and {b * 1e3:.3g} ms ({where_b}), "
               f"{factor:.2f}x apart")
    return _busy(what, load, numbers) or (
        Verdict(what, SUSPICIOUS, f"suspicious (the same configuration, more than "
                f"{apart:.2f}x apart): {numbers}")
        if factor > apart else Verdict(what, CONSISTENT, f"agrees: {numbers}"))


def baseline_beats(what: str, baseline_seconds: float, rung_seconds: float, *,
                   baseline: str, rung: str, load: Load | None = None) -> Verdict:
    """A strong baseline (e.g. PyTorch's SDPA) against a rung it should beat (e.g. a
    scalar loop): suspicious when the baseline is the slower one (then a ratio against
    it flatters every kernel)."""
    base, r = _positive("baseline_seconds", baseline_seconds), _positive("rung_seconds",
                                                                         rung_seconds)
    numbers = f"{baseline} {base * 1e3:.3g} ms, {rung} {r * 1e3:.3g} ms"
    return _busy(what, load, numbers) or (
        Verdict(what, SUSPICIOUS, f"suspicious (the baseline is slower than {rung}): "
                f"{numbers}")
        if base > r else Verdict(what, CONSISTENT, f"agrees: {numbers}"))


def planner_choice(what: str, chosen: str, seconds: dict, *, slack: float = CHOICE_SLACK,
                   ranges: dict | None = None, load: Load | None = None) -> Verdict:
    """The planner's ``chosen`` option against every option timed in the same table
    (``{option: seconds}``, medians): suspicious when another is faster by more than
    ``slack``, and, given ``ranges`` (``{option: (q25, q75)}``), their quartile ranges
    do not overlap (an overlap reads ``inconclusive (spread)``)."""
    if chosen not in seconds:
        raise ValueError(f"chosen: {chosen!r} is not among the timed options "
                         f"{sorted(map(str, seconds))}")
    times = {k: _positive(f"seconds[{k!r}]", v) for k, v in seconds.items()}
    slack = _at_least_one("slack", slack)
    if ranges is not None and not set(times) <= set(ranges):
        raise ValueError(f"ranges: needs (q25, q75) for every timed option, missing "
                         f"{sorted(map(str, set(times) - set(ranges)))}")
    best = min(times, key=times.get)
    numbers = (f"chose {chosen} ({times[chosen] * 1e3:.3g} ms); fastest {best} "
               f"({times[best] * 1e3:.3g} ms)")
    busy = _busy(what, load, numbers)
    if busy or times[chosen] <= slack * times[best]:
        return busy or Verdict(what, CONSISTENT, f"agrees: {numbers}")
    if ranges is not None and ranges[chosen][0] <= ranges[best][1]:
        return Verdict(what, INCONCLUSIVE, f"inconclusive (spread: the two quartile ranges "
                       f"overlap); {numbers}")
    return Verdict(what, SUSPICIOUS, f"suspicious (the choice is "
                   f"{times[chosen] / times[best]:.2f}x slower than an alternative): {numbers}")


def is_suspicious(row: dict) -> bool:
    """Whether a saved verdict row (:meth:`Verdict.row`) is a consistency check that
    fired."""
    return str(row.get("status", "")).startswith(SUSPICIOUS)


__all__ = ["fraction_of_peak", "above_floor", "same_configuration", "baseline_beats",
           "planner_choice", "is_suspicious", "CONSISTENT", "SUSPICIOUS", "PEAK_SLACK",
           "APART", "CHOICE_SLACK"]
