"""One verdict rule for every budget, target and published claim a lesson states.

A lesson never writes its outcome as a sentence in advance; it states a budget, measures,
and prints the verdict this module computes from that run:

* ``met`` / ``not met`` for a budget (:func:`judge`): a measured value against a bound
  (``>= need``, ``<= need``, or a ``(low, high)`` band);
* ``consistent`` / ``understated`` / ``overstated here`` for a published claim
  (:func:`judge_claim`): a measured ratio against a claimed range;
* ``inconclusive`` for either, when the measurement cannot decide:

  - **machine busy**: the timing window's :class:`fa_lab.settings.machine.Load` says other
    processes (or the hypervisor) took CPU time (thresholds in :mod:`fa_lab.settings.config`);
  - **spread**: the value's quartile range straddles the bound. A timed value is
    judged on its range, not its median alone: for a ratio of two timed contenders
    ``a / b`` the range is ``q25(a)/q75(b) .. q75(a)/q25(b)`` (:func:`ratio_range`).

Deterministic values (bytes, counts) have no spread: pass only ``value``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fa_lab.settings.machine import Load

#: A claim measured within this factor of its claimed range counts as consistent:
#: configurations a claim leaves unstated (batch, d, the baseline's implementation,
#: the machine) move a ratio that much.
CLAIM_SLACK = 1.25

MET, NOT_MET, INCONCLUSIVE = "met", "not met", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """A computed verdict: ``status`` (one word or two) and a line with the numbers."""

    what: str
    status: str
    text: str
    busy: bool = False

    def __str__(self) -> str:
        return f"{self.what}: {self.text}"

    def row(self) -> dict:
        return {"what": self.what, "status": self.status, "detail": self.text,
                "busy": self.busy}


def quartiles(samples) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of timing samples."""
    t = np.asarray(samples, dtype=np.float64)
    return float(np.percentile(t, 25)), float(np.median(t)), float(np.percentile(t, 75))


def ratio_range(num, den) -> tuple[float, float, float]:
    """``median(num) / median(den)`` and its conservative quartile range.

    With ``num`` the slower contender's times and ``den`` the faster's, this is a
    speedup: ``(low, value, high)`` with ``low = q25(num) / q75(den)`` and
    ``high = q75(num) / q25(den)``.
    """
    n25, n50, n75 = quartiles(num)
    d25, d50, d75 = quartiles(den)
    return n25 / d75, n50 / d50, n75 / d25


def _fmt(x, fmt) -> str:
    return fmt.format(x)


def _busy(load: Load | None) -> str:
    return load.reason if (load is not None and load.busy) else ""


def judge(what: str, value: float, need, *, at_least: bool = True, low=None, high=None,
          load: Load | None = None, fmt: str = "{:.2f}x") -> Verdict:
    """A budget's verdict.

    ``need`` is a number (``value >= need`` when ``at_least``, else ``value <= need``)
    or a ``(low, high)`` band. ``low``/``high`` are the value's quartile range (default:
    the value itself, for deterministic quantities); ``load`` the timing window's load.
    """
    low = value if low is None else low
    high = value if high is None else high
    measured = _fmt(value, fmt)
    if low != high:
        measured += f" (quartile range {_fmt(low, fmt)} to {_fmt(high, fmt)})"
    if isinstance(need, (tuple, list)):
        lo_need, hi_need = need
        bound = f"between {_fmt(lo_need, fmt)} and {_fmt(hi_need, fmt)}"
        ok, bad = lo_need <= low and high <= hi_need, high < lo_need or low > hi_need
    elif at_least:
        bound = f">= {_fmt(need, fmt)}"
        ok, bad = low >= need, high < need
    else:
        bound = f"<= {_fmt(need, fmt)}"
        ok, bad = high <= need, low > need
    busy = _busy(load)
    if busy:
        return Verdict(what, INCONCLUSIVE, f"inconclusive (machine busy: {busy}); measured "
                       f"{measured}, budget {bound}", True)
    if ok:
        return Verdict(what, MET, f"met: {measured}, budget {bound}")
    if bad:
        return Verdict(what, NOT_MET, f"not met: {measured}, budget {bound}")
    return Verdict(what, INCONCLUSIVE, f"inconclusive (spread: the quartile range straddles "
                   f"the budget); measured {measured}, budget {bound}")


def judge_claim(what: str, value: float, claim_low: float, claim_high: float, *, low=None,
                high=None, load: Load | None = None, slack: float = CLAIM_SLACK,
                fmt: str = "{:.2f}x") -> Verdict:
    """A published claim's verdict: the measured range against ``claim_low..claim_high``
    widened by ``slack`` either way (:data:`CLAIM_SLACK`)."""
    low = value if low is None else low
    high = value if high is None else high
    span = _fmt(claim_low, fmt) if claim_low == claim_high else (
        f"{_fmt(claim_low, fmt)}-{_fmt(claim_high, fmt)}")
    measured = _fmt(value, fmt)
    if low != high:
        measured += f" (quartile range {_fmt(low, fmt)} to {_fmt(high, fmt)})"
    busy = _busy(load)
    if busy:
        return Verdict(what, INCONCLUSIVE, f"inconclusive (machine busy: {busy}); measured "
                       f"{measured}, claimed {span}", True)
    band_low, band_high = claim_low / slack, claim_high * slack
    if high < band_low:
        return Verdict(what, "overstated here", f"overstated here: {measured} measured, less "
                       f"than the {span} claimed")
    if low > band_high:
        return Verdict(what, "understated", f"understated: {measured} measured, more than "
                       f"the {span} claimed")
    if band_low <= low and high <= band_high:
        return Verdict(what, "consistent", f"consistent: {measured} measured, {span} claimed")
    return Verdict(what, INCONCLUSIVE, f"inconclusive (spread: the quartile range reaches "
                   f"outside the claimed range); measured {measured}, claimed {span}")


__all__ = ["Verdict", "judge", "judge_claim", "quartiles", "ratio_range", "CLAIM_SLACK",
           "MET", "NOT_MET", "INCONCLUSIVE"]
