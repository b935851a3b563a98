"""The course's checked exercises (lessons 04, 08, 10 and 13 here, the others in
:mod:`.exercises_more`): the learner works out a number by hand in a stub cell; :func:`check` says whether it is right and, when it is not, what
the answer most likely missed (each exercise lists the common mistakes it recognises,
as factors or values of the right answer), not only pass or fail.

Every expected value is computed by the library itself (quantization, RoPE, bf16
rounding, the state merge), so a change there changes the exercise; the instruction
shapes are the architecture's (AVX-512 lanes, AMX palette 1).
The answers are in ``tests/test_exercises.py``, which also checks that each listed
mistake is recognised.
"""

from __future__ import annotations

import math
import numpy as np

from fa_lab.features.decoding.rope import rope
from fa_lab.numerics import quant
from fa_lab.numerics.merge import merge_states
from fa_lab.lessons.exercise_kit import Exercise, close, factor_of, judge
from fa_lab.lessons.exercises_more import EXERCISES as MORE


# ---------------------------------------------------------------- lesson 04: INT8

_ROW = np.array([[0.554, -2.54, 1.013, 0.031]])


def _int8_row():
    xq, s = quant.quantize(_ROW, "per_token", scale_dtype=np.float64)
    return (float(s[0, 0]),) + tuple(int(v) for v in xq[0])


def _int8_mistakes(answer, want):
    scale = answer[0]
    if close(scale, 2.54 / 128, 1e-3):
        return "the scale divides max|x| by 127 (the symmetric range is -127..127), not 128"
    if close(scale, (1.013 + 2.54) / 255, 1e-3):
        return "that is an asymmetric (zero-point) scale, (max - min) / 255; this lesson's INT8 is symmetric"
    if close(scale, 2.54 / 127.5, 1e-3):
        return "the scale divides max|x| by 127 (the symmetric range is -127..127), not 127.5"
    if not close(scale, want[0], 1e-3):
        return f"the scale is max|x| / 127 = {want[0]:.6g}; got {scale!r}"
    ints = tuple(answer[1:])
    if ints == tuple(int(v) for v in np.trunc(_ROW[0] / want[0])):
        return "the integers are truncated; round to the nearest instead"
    return "the scale is right; the integers are round(x / scale), clipped to -127..127"


# ---------------------------------------------------------------- lesson 04: smoothing

_Q, _M = np.array([1.0, 2.0]), np.array([0.5, -1.0])


def _lse_shift():
    return float(_Q @ _M / math.sqrt(_Q.size))


def _lse_mistakes(answer, want):
    return factor_of(answer, want, {
        -1.0: "the sign is flipped: smoothed scores are lower by scale q . m, so the true "
              "LSE is the smoothed one plus scale q . m",
        math.sqrt(2.0): "the softmax scale 1 / sqrt(d) is missing",
        1 / math.sqrt(2.0): "the softmax scale is 1 / sqrt(d), not 1 / d"})


# ---------------------------------------------------------------- lesson 08: decoding

def _decode_mib():
    Nk, H_kv, d, itemsize = 4096, 8, 64, 4
    return 2 * Nk * H_kv * d * itemsize / 2**20


def _decode_mistakes(answer, want):
    return factor_of(answer, want, {
        0.5: "only K or only V: a step reads both",
        2**20 / 1e6: "MB (10^6 bytes), not MiB (2^20)",
        4.0: "H = 32 query heads read the cache once per kv head (8), not once per query head",
        1 / 8: "one kv head; there are 8"})


def _rope_angle():
    """The angle of channel pair 1 at position 5, d = 64, base 10000: :func:`rope`'s own
    rotation of that pair's unit vector at position 1 (its frequency; no wrap-around),
    times 5."""
    d, pair, pos = 64, 1, 5
    x = np.zeros((1, d))
    x[0, pair] = 1.0  # the pair is (pair, pair + d/2) in the half-split layout
    y = rope(x, np.array([1]))
    return pos * float(math.atan2(y[0, pair + d // 2], y[0, pair]))


def _rope_mistakes(answer, want):
    if close(answer, 5.0, 1e-3):
        return "that is pair 0's angle (frequency 1); pair i turns at base^(-2i/d)"
    if close(answer, 5 * 10000 ** (-1 / 64), 1e-3):
        return "the exponent is -2i/d (pairs), not -i/d"
    if close(answer, math.degrees(want), 1e-3):
        return "that is in degrees; answer in radians"
    return None


# ---------------------------------------------------------------- lesson 10: precision

#: AMX palette 1: a tile is at most 16 rows of 64 bytes (an architectural constant, as
#: ``amx_tiles`` configures it; the lessons do not import kernels).
TILE_ROWS, TILE_BYTES = 16, 64


def _macs():
    return (16 * 4, TILE_ROWS * TILE_ROWS * TILE_BYTES)  # 16 lanes x 4 bytes; 16 x 16 x 64


def _macs_mistakes(answer, want):
    if tuple(answer) == tuple(2 * w for w in want):
        return "those count a multiply and an add as two operations; count multiply-adds"
    if answer[0] == 16:
        return "vpdpbusd adds four byte products into each of its 16 int32 lanes"
    if answer[1] == TILE_ROWS * TILE_ROWS:
        return "each of the 16 x 16 outputs of tdpbssd sums 64 byte products"
    return None


_X_BF16 = 1.0 + 3 * 2.0**-9


def _bf16_value():
    return float(quant.from_bf16(quant.to_bf16(np.float32(_X_BF16)))[()])


def _bf16_mistakes(answer, want):
    if close(answer, 1.0, 1e-9):
        return "that truncates the mantissa; bf16 rounds to nearest even"
    if close(answer, _X_BF16, 1e-9):
        return "that keeps float32's mantissa; bf16 keeps 7 bits after the point"
    if close(answer, want, 1e-3):
        return "close: give every digit (a bf16 value near 1 is a multiple of 2**-7)"
    return None


# ---------------------------------------------------------------- lesson 13: merging

def _merge():
    o, lse = merge_states(np.array([[[[1.0]]]]), np.array([[[2.0]]]),
                          np.array([[[[4.0]]]]), np.array([[[3.0]]]))
    return (float(o.ravel()[0]), float(lse.ravel()[0]))


def _merge_mistakes(answer, want):
    o, lse = answer
    if close(lse, 3.0, 1e-4):
        return "the merged LSE is log(e^2 + e^3), more than the larger of the two"
    if close(lse, 5.0, 1e-4) or close(lse, 2.5, 1e-4):
        return "LSEs are logs of sums: add exp(lse), then take the log"
    if close(lse, want[1], 1e-3) and close(o, 2.5, 1e-3):
        return "the LSE is right; the outputs are weighted by exp(lse_i - lse), not averaged"
    if close(lse, want[1], 1e-3) and close(o, (math.e**3 * 1 + math.e**2 * 4)
                                             / (math.e**2 + math.e**3), 1e-3):
        return "the weights are swapped: the part with the larger LSE weighs more"
    return None


def _merge_empty():
    o, lse = merge_states(np.array([[[[np.nan]]]]), np.array([[[-np.inf]]]),
                          np.array([[[[4.0]]]]), np.array([[[3.0]]]))
    return (float(o.ravel()[0]), float(lse.ravel()[0]))


def _merge_empty_mistakes(answer, want):
    o, lse = answer
    if math.isnan(o):
        return ("a part that saw no key has weight exp(-inf - lse) = 0: its output (even "
                "NaN) must not reach the merge")
    if lse == -math.inf:
        return "the union saw the other part's keys: its LSE is that part's"
    return None


EXERCISES = {
    "int8_row": Exercise(
        "04_int8_attention",
        "Quantize the key row [0.554, -2.54, 1.013, 0.031] to symmetric INT8 with one scale for "
        "the row. Answer (scale, i0, i1, i2, i3).",
        "scale = max|x| / 127; i = round(x / scale), kept in -127..127",
        _int8_row, _int8_mistakes, rtol=1e-6),
    "smoothing_lse": Exercise(
        "04_int8_attention",
        "Smoothing subtracts K's channel mean m = [0.5, -1] from every key. For the query "
        "q = [1, 2] (d = 2, softmax scale 1/sqrt(d)), what must be added to the smoothed "
        "row's LSE to get the true one? Answer a number.",
        "every score q . k_j drops by the same q . m, times the softmax scale",
        _lse_shift, _lse_mistakes, rtol=1e-4),
    "decode_mib": Exercise(
        "08_decoding_and_retrieval",
        "One decode step over a float32 cache of Nk = 4096 tokens with H_kv = 8 kv heads "
        "(32 query heads) and d = 64: how many MiB of the cache does it read, at least? "
        "Answer a number.",
        "K and V, every token, every kv head, 4 bytes each; 1 MiB = 2**20 bytes",
        _decode_mib, _decode_mistakes),
    "rope_angle": Exercise(
        "08_decoding_and_retrieval",
        "RoPE with base 10000 and d = 64 rotates channel pair i at position p by the angle "
        "p * base^(-2i/d). By what angle (radians, not reduced modulo 2 pi) is pair i = 1 "
        "rotated at position 5? Answer a number.",
        "the pairs' frequencies fall geometrically from 1 (pair 0)",
        _rope_angle, _rope_mistakes, rtol=1e-4),
    "macs": Exercise(
        "10_low_precision_microkernels",
        "How many multiply-adds does one vpdpbusd on zmm registers do, and one AMX "
        "tdpbssd on full tiles? Answer (vpdpbusd, tdpbssd).",
        "vpdpbusd: 16 int32 lanes, 4 bytes each; tdpbssd: a 16 x 64 by 64 x 16 product",
        _macs, _macs_mistakes, rtol=0.0),
    "bf16_round": Exercise(
        "10_low_precision_microkernels",
        "P = 1 + 3 * 2**-9 in float32. What value does it have once rounded to bf16 (as "
        "the P V micro-kernels read it)? Answer a number.",
        "bf16 keeps 7 mantissa bits: near 1 its steps are 2**-7; round to nearest even",
        _bf16_value, _bf16_mistakes, rtol=1e-9),
    "merge": Exercise(
        "13_merging_states",
        "Two partial attentions over disjoint keys, one channel: (o1 = 1.0, lse1 = 2.0) "
        "and (o2 = 4.0, lse2 = 3.0). What are the merged output and LSE? Answer (o, lse).",
        "lse = log(e^lse1 + e^lse2); o = sum of o_i exp(lse_i - lse)",
        _merge, _merge_mistakes, rtol=1e-4),
    "merge_empty": Exercise(
        "13_merging_states",
        "A split of the keys saw none of them (a fully masked block): its state is (o1 = "
        "NaN, lse1 = -inf). Merged with (o2 = 4.0, lse2 = 3.0), what are the output and "
        "LSE? Answer (o, lse).",
        "the weight of part i is exp(lse_i - lse); exp(-inf) = 0",
        _merge_empty, _merge_empty_mistakes, rtol=1e-6),
}


#: Every checked exercise of the course: these and :data:`.exercises_more.EXERCISES`.
EXERCISES = {**EXERCISES, **MORE}


def names(lesson: str | None = None) -> list[str]:
    """The exercises (of one lesson, by notebook stem)."""
    return [n for n, e in EXERCISES.items() if lesson is None or e.lesson == lesson]


def _get(name):
    if name not in EXERCISES:
        raise ValueError(f"name: one of {sorted(EXERCISES)}, got {name!r}")
    return EXERCISES[name]


def show(name: str) -> None:
    """Print the task and its hint."""
    e = _get(name)
    print(f"exercise {name!r}: {e.task}\n  hint: {e.hint}")


def check(name: str, answer) -> str:
    """A sentence: right, not yet answered (``None``), or what the answer misses."""
    return judge(_get(name), answer)
