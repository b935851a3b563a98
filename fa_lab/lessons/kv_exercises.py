"""Lesson 14's checked exercises: the learner computes a number (or two) by hand;
:func:`check` says whether it is right and, if not, what went wrong (a reading of the
wrong answer, not only pass or fail). The expected values come from the library itself
(:mod:`fa_lab.numerics.kvquant`), so a change of format changes the exercise."""

from __future__ import annotations

import numbers

import numpy as np

from fa_lab.numerics.kvquant import bytes_per_token, dequantize_kv

EXERCISES = {
    "cache_gib": ("How many GiB does one 131072-token sequence take in a Llama-3-8B-shaped "
                  "int8 cache (32 layers, 8 kv heads, d = 128; K and V; one float32 scale "
                  "per token, kv head and tensor)? Answer a float.",
                  "per token and kv head: 2 x 128 int8 bytes + 2 x 4 bytes of scales; "
                  "then x 8 kv heads x 32 layers x 131072 tokens / 2**30"),
    "int4_byte": ("An int4 cache row (group of 8 channels, scale 0.5) holds the byte 0x9C "
                  "at position 1. Which two channels does it hold, and what are their "
                  "values? Answer ((channel, value), (channel, value)), low nibble first.",
                  "low nibble 0xC, high nibble 0x9, each a 4-bit two's complement number; "
                  "byte j of a group of g holds channels j and j + g / 2"),
}


def _expected(name):
    if name == "cache_gib":
        return 32 * 8 * 131072 * bytes_per_token(128, kv_dtype="int8") / 2**30
    row = np.zeros((1, 4), np.uint8)
    row[0, 1] = 0x9C
    values = dequantize_kv(row, np.full((1, 1), 0.5, np.float32))[0]
    return ((1, float(values[1])), (5, float(values[5])))


def show(name: str) -> None:
    task, hint = EXERCISES[name]
    print(f"exercise {name!r}: {task}\n  hint: {hint}")


def check(name: str, answer) -> str:
    """A sentence: right, not yet answered (``None``), or what the answer misses."""
    if name not in EXERCISES:
        raise ValueError(f"name must be one of {sorted(EXERCISES)}, got {name!r}")
    if answer is None:
        return "not yet: replace None with your answer"
    want = _expected(name)
    if name == "cache_gib":
        if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, numbers.Real):
            return f"not yet: answer a number of GiB, got {answer!r}"
        if abs(answer - want) <= 0.01 * want:
            f32 = 32 * 8 * 131072 * bytes_per_token(128) / 2**30
            return f"right: {want:.3f} GiB (float32 would take {f32:.0f})"
        no_scales = 32 * 8 * 131072 * 256 / 2**30
        if abs(answer - no_scales) <= 0.01 * no_scales:
            return "not yet: you left out the scales (one float32 per token, head and tensor)"
        readings = {0.5: "only K or only V (count both)", 2**30 / 1e9: "GB (10^9), not GiB (2^30)",
                    1 / 32: "one layer (there are 32)", 1 / 8: "one kv head (there are 8)",
                    0.25: "32k tokens, not 131072"}
        for factor, why in readings.items():
            if abs(answer / want - factor) <= 0.01 * factor:
                return f"not yet: that is {why}"
        return f"not yet: {answer} is off by a factor {answer / want:.3g}"
    try:
        (c0, v0), (c1, v1) = answer
    except (TypeError, ValueError):
        return f"not yet: answer ((channel, value), (channel, value)), got {answer!r}"
    if (c0, c1) != (want[0][0], want[1][0]):
        if (c1, c0) == (want[0][0], want[1][0]):
            return "not yet: the right channels, but give the low nibble's channel first"
        if (c0, c1) == (want[0][0] + 1, want[1][0] + 1):
            return "not yet: channels count from 0"
        if c1 == c0 + 1:
            return ("not yet: the channels are wrong; byte j of a group of 8 holds channels "
                    "j and j + 4, not neighbours")
        return f"not yet: the channels are wrong ({c0}, {c1})"
    if (float(v0), float(v1)) != (want[0][1], want[1][1]):
        return (f"not yet: the values are wrong ({v0}, {v1}); read each nibble as a signed "
                f"4-bit number, then multiply by the scale")
    return f"right: channel {c0} = {v0}, channel {c1} = {v1}"
