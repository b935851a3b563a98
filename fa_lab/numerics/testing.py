"""One tolerance table, one ``assert_close``, and the awkward shapes every test uses.

The float32 rule is flash-attn's: a kernel's error against the float64 reference may
be at most ``FACTOR`` times the error of a straightforward float32 implementation
(:func:`fa_lab.numerics.reference.attention` with ``dtype=np.float32``), plus a floor at the
output's rounding level. A fixed epsilon would be either too loose for easy inputs
or too tight for logits of magnitude 1e4; this rule scales with the problem.
float64 kernels must agree with the reference to ``rtol=atol=1e-12``-ish.

The floor is 2 float32 ulps (``np.spacing``) at the magnitude of the values that
are rounded, because operation order alone moves a result by a few ulps and the
baseline's max error over a tiny problem can be ~0. For the output (a convex
combination of the rows of ``v``) that magnitude is ``max|v|``; for
``lse = m + log(l)`` it is ``max|lse| + log(Nk) + scale * max|q_i| * max|k_j|``:
both terms can be larger than the result (``0 <= log l <= log Nk``), and a score is a
float32 dot product whose rounding scales with ``sum_t |q_t k_t|`` (bounded by the
norms), not with its value. With the LSE's own size as the floor, a kernel "failed"
by 7 ulps on a single-key row (N=1, d=64: the LSE is one dot product) where NumPy's
BLAS happened to round better.
flash-attn's floor, ``2 * max|(e + 0.3) - 0.3 - e|``, estimates the same rounding
level statistically; on a single value it can be exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fa_lab.numerics import reference

#: name -> (factor on the same-precision baseline error, absolute floor scale)
TOLERANCE = {
    "float32": {"factor": 2.0, "floor_ulps": 2.0},  # forward (flash-attn's rule)
    "float32_grad": {"factor": 3.0, "floor_ulps": 2.0},  # gradients (flash-attn's rule)
    # half-precision inputs (computed in float32, returned rounded): the same 2x rule
    # against reference.attention_half, the floor in the half type's own ulps
    "float16": {"factor": 2.0, "floor_ulps": 2.0, "bits": 10},
    "bfloat16": {"factor": 2.0, "floor_ulps": 2.0, "bits": 7},
    "float64": {"rtol": 1e-12, "atol": 1e-12},
}


class ToleranceError(AssertionError):
    """Raised by :func:`assert_close`; the message names the worst element."""


def _rounding_floor(values, ulps: float, bits: int = 23) -> float:
    """``ulps`` units in the last place of a float with ``bits`` mantissa bits (float32:
    23, float16: 10, bfloat16: 7) at the largest of ``values``."""
    biggest = np.max(np.abs(np.asarray(values, dtype=np.float64)), initial=0.0)
    if bits == 23:
        return float(ulps * np.spacing(np.float32(biggest)))
    exponent = np.floor(np.log2(biggest)) if biggest > 0 else -14.0
    return float(ulps * 2.0 ** (exponent - bits))


def _check_special(actual, expected, what):
    """NaN and +-inf must sit at the same places in both (they are never 'close')."""
    for label, fn in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        a, e = fn(actual), fn(expected)
        if not np.array_equal(a, e):
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(a != e), a.shape))
            raise ToleranceError(f"{what}: {label} pattern differs at index {idx}: actual "
                                 f"{actual[idx]!r}, expected {expected[idx]!r}")


def allowed_error(expected, baseline, rule="float32", magnitude=None) -> float:
    """The largest absolute error the rule allows, given the baseline's result.

    ``magnitude``: the size of the rounded intermediate values, for the floor
    (default: the expected values themselves).
    """
    tol = TOLERANCE[rule]
    finite = np.isfinite(expected) & np.isfinite(baseline)
    base_err = np.max(np.abs(baseline[finite].astype(np.float64) - expected[finite]),
                      initial=0.0)
    floor_of = expected[finite] if magnitude is None else np.atleast_1d(magnitude)
    return tol["factor"] * base_err + _rounding_floor(floor_of, tol["floor_ulps"],
                                                      tol.get("bits", 23))


def assert_close(actual, expected, *, baseline=None, rule=None, what="output",
                 magnitude=None):
    """Assert ``actual`` matches the float64 ``expected``; report the worst element.

    Parameters
    ----------
    actual : array (any float dtype)
    expected : array, float64, same shape
    baseline : array, optional
        The same computation by a straightforward implementation in ``actual``'s
        precision. Required for the float32 rules.
    rule : key of :data:`TOLERANCE`; default by ``actual.dtype``
    what : a name for the message
    magnitude : float, optional
        Size of the rounded values for the float32 floor (default ``max|expected|``;
        see the module docstring: ``max|v|`` for an attention output,
        :func:`lse_magnitude` for an LSE).

    Returns
    -------
    dict with ``max_error`` and ``allowed`` (for reporting).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ToleranceError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    rule = rule or ({"float64": "float64", "float16": "float16", "bfloat16": "bfloat16"}
                    .get(actual.dtype.name, "float32"))
    _check_special(actual, expected, what)
    finite = np.isfinite(expected)
    err = np.where(finite, np.abs(actual.astype(np.float64) - np.where(finite, expected, 0)), 0)
    if rule == "float64":
        tol = TOLERANCE[rule]
        allowed_each = tol["atol"] + tol["rtol"] * np.abs(np.where(finite, expected, 0))
        excess = err - allowed_each
        allowed = float(np.max(allowed_each, initial=0.0))
    else:
        if baseline is None:
            raise ValueError(f"rule {rule!r} needs the same-precision baseline result")
        allowed = allowed_error(expected, np.asarray(baseline), rule, magnitude)
        excess = err - allowed
    max_error = float(np.max(err, initial=0.0))
    if excess.size and np.max(excess) > 0:
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
        raise ToleranceError(
            f"{what}: max error {err[idx]:.3e} at index {idx} (actual {actual[idx]!r}, "
            f"expected {expected[idx]!r}) exceeds the {rule} rule's allowance "
            f"{allowed if rule != 'float64' else allowed_each[idx]:.3e}")
    return {"max_error": max_error, "allowed": allowed}


def numerical_grads(loss, arrays: dict, eps: float = 1e-6) -> dict:
    """Central finite differences of a scalar ``loss(**arrays)`` for every element of
    every float64 array in ``arrays`` (name -> array): the checker of analytic
    gradients. ``O(size)`` calls of ``loss``: tiny shapes only."""
    grads = {}
    for name, x in arrays.items():
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            num[idx] = (loss(**{**arrays, name: xp}) - loss(**{**arrays, name: xm})) / (2 * eps)
        grads[name] = num
    return grads


def assert_grads_match_finite_differences(grads, q, k, v, dout, **opts):
    """``grads = (dq, dk, dv)`` of ``sum(attention(q, k, v, **opts) * dout)`` equal the
    finite differences of the float64 reference forward (float64 inputs)."""
    def loss(q, k, v):
        return np.sum(reference.attention(q, k, v, **opts)[0] * dout)

    num = numerical_grads(loss, {"q": q, "k": k, "v": v})
    for name, g in zip("qkv", grads):
        np.testing.assert_allclose(g, num[name], atol=1e-7, rtol=1e-6, err_msg=f"d{name}")


def lse_magnitude(lse, q, k, scale=None) -> float:
    """Size of the rounded terms of an LSE: ``max|lse| + log(Nk) + scale*max|q_i|*max|k_j|``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    finite = np.asarray(lse)[np.isfinite(lse)]
    dots = abs(scale) * (np.max(np.linalg.norm(q, axis=-1), initial=0.0) *
                         np.max(np.linalg.norm(k, axis=-1), initial=0.0))
    return float(np.max(np.abs(finite), initial=0.0) + np.log(max(k.shape[-2], 1)) + dots)


@dataclass(frozen=True)
class Case:
    """One attention problem: shapes and options, with a readable id."""

    B: int = 1
    H: int = 2
    H_kv: int | None = None
    Nq: int = 17
    Nk: int | None = None
    d: int = 7
    causal: object = False
    block_q: int | None = None
    block_kv: int | None = None

    @property
    def id(self) -> str:
        kv = f"/{self.H_kv}" if self.H_kv else ""
        nk = self.Nk if self.Nk is not None else self.Nq
        blocks = f"-b{self.block_q}x{self.block_kv}" if self.block_q else ""
        return f"B{self.B}H{self.H}{kv}-q{self.Nq}k{nk}-d{self.d}-{self.causal}{blocks}"

    def inputs(self, dtype=np.float32, seed=0, magnitude=1.0):
        """Gaussian q, k, v of this case's shapes (q scaled by ``magnitude``)."""
        rng = np.random.default_rng(seed)
        nk = self.Nk if self.Nk is not None else self.Nq
        hkv = self.H_kv or self.H
        q = rng.standard_normal((self.B, self.H, self.Nq, self.d)) * magnitude
        k = rng.standard_normal((self.B, hkv, nk, self.d))
        v = rng.standard_normal((self.B, hkv, nk, self.d))
        return q.astype(dtype), k.astype(dtype), v.astype(dtype)


#: Awkward shapes: N = 1, 3, 17, 64, 113, 127, 257; Nq != Nk both ways; d = 1, 7, 64,
#: 128; block sizes that do not divide N; both causal alignments; GQA/MQA.
AWKWARD_CASES = [
    Case(Nq=1, d=1),
    Case(Nq=3, d=7, block_q=2, block_kv=2),
    Case(Nq=17, d=64, causal=True),
    Case(Nq=64, d=128, block_q=16, block_kv=32),
    Case(Nq=113, d=7, causal=True, block_q=32, block_kv=16),
    Case(Nq=127, d=64, causal="bottom_right", block_q=64, block_kv=64),
    Case(Nq=257, d=64, H=1, block_q=64, block_kv=48),
    Case(Nq=257, Nk=3, d=7, causal="bottom_right", block_q=16, block_kv=2),  # Nq > Nk
    Case(Nq=3, Nk=257, d=7, causal="bottom_right", block_q=2, block_kv=64),  # Nq < Nk
    Case(Nq=113, Nk=17, d=1, causal=True, block_q=8, block_kv=5),
    Case(Nq=17, Nk=113, d=64, causal=True, block_q=5, block_kv=8),
    Case(B=2, H=4, H_kv=2, Nq=64, Nk=127, d=7, causal="bottom_right", block_q=16,
         block_kv=16),  # grouped-query
    Case(B=3, H=4, H_kv=1, Nq=17, Nk=17, d=7, causal=True, block_q=4, block_kv=3),  # MQA
    Case(B=1, H=1, Nq=1, Nk=257, d=128, causal="bottom_right"),  # decode step
]
