"""The checked exercises of lessons 04, 08, 10 and 13: the answers (worked by hand here,
not read from the package), each recognised mistake, and bad answers."""

import math

import pytest

from fa_lab.lessons import exercises

E2, E3 = math.e**2, math.e**3
ANSWERS = {
    "int8_row": (2.54 / 127, 28, -127, 51, 2),  # 0.554 / 0.02 = 27.7 -> 28; 1.013 -> 50.65 -> 51
    "smoothing_lse": (1 * 0.5 + 2 * -1.0) / math.sqrt(2),
    "decode_mib": 2 * 4096 * 8 * 64 * 4 / 2**20,  # 16 MiB
    "rope_angle": 5 * 10000 ** (-2 / 64),
    "macs": (16 * 4, 16 * 16 * 64),
    "bf16_round": 1 + 2**-7,  # 1 + 0.75 steps of 2**-7: rounds up
    "merge": ((E2 * 1 + E3 * 4) / (E2 + E3), math.log(E2 + E3)),
    "merge_empty": (4.0, 3.0),  # the empty part weighs exp(-inf) = 0
}

MISTAKES = [
    ("int8_row", (2.54 / 128, 28, -127, 51, 2), "127"),
    ("int8_row", ((1.013 + 2.54) / 255, 40, -127, 51, 2), "asymmetric"),
    ("int8_row", (2.54 / 127.5, 28, -127, 51, 2), "127.5"),
    ("int8_row", (2.54 / 127, 27, -127, 50, 1), "truncated"),
    ("smoothing_lse", 1.5 / math.sqrt(2), "sign"),
    ("smoothing_lse", -1.5, "sqrt"),
    ("smoothing_lse", -0.75, "1 / d"),
    ("decode_mib", 8.0, "both"),
    ("decode_mib", 16 * 2**20 / 1e6, "MB"),
    ("decode_mib", 64.0, "query heads"),
    ("rope_angle", 5.0, "pair 0"),
    ("rope_angle", 5 * 10000 ** (-1 / 64), "-2i/d"),
    ("rope_angle", math.degrees(5 * 10000 ** (-2 / 64)), "degrees"),
    ("macs", (128, 32768), "two operations"),
    ("macs", (16, 16384), "four byte products"),
    ("macs", (64, 256), "64 byte products"),
    ("bf16_round", 1.0, "truncates"),
    ("bf16_round", 1 + 3 * 2**-9, "7 bits"),
    ("merge", (3.5, 3.0), "larger of the two"),
    ("merge", (3.5, 5.0), "logs of sums"),
    ("merge", (2.5, math.log(E2 + E3)), "weighted"),
    ("merge", ((E3 * 1 + E2 * 4) / (E2 + E3), math.log(E2 + E3)), "swapped"),
    ("merge_empty", (float("nan"), 3.0), "must not reach"),
    ("merge_empty", (4.0, -math.inf), "other part"),
]


# ---------------------------------------------------------------- lessons 00, 02, 05, 06, 06b, 06c, 11, 12

GF = 4 * 8 * 2048 * 2048 * 64 / 1e9  # two products of 2 N^2 d per head
ANSWERS.update({
    "gflop": GF,
    "scores_mib": 8192 * 8192 * 4 / 2**20,  # 256 MiB
    "tiles": (16 * 16, 16 * 17 // 2),  # ceil(1000 / 64) = 16 per side
    "growth": (4, 2),
    "min_mib": (8 * 4096 * 64 + 8 * 4096) * 4 / 2**20,
    "rate": GF / 0.025,
    "causal_rate": GF / 2 / 0.014,
    "decode_splits": (4, 2048),  # 8 threads / (1 x 2 heads); 8192 / 4
    "tile_kib": 4 * (2 * 128 * 64 + 2 * 64 * 64 + 128 * 64 + 2 * 128) / 1024,  # 129 KiB
    "claim_range": (110 / 33, 130 / 28),
    "claim_window": (2 / 1.25, 4 * 1.25),
    "head_dim": 32,
    "gqa": (4, 4),
    "smem_kib": 3 * 64 * 64 * 4 / 1024,  # Q, K and V tiles: 48 KiB
    "blocks_per_sm": 4,  # 228 // 48
})
MISTAKES += [
    ("gflop", GF / 2, "one product"),
    ("gflop", GF / 8, "one head"),
    ("scores_mib", 8192 * 8192 * 4 / 1e6, "MB"),
    ("scores_mib", 8192 * 8192 * 8 / 2**20, "4 bytes"),
    ("tiles", (225, 120), "partial"),
    ("tiles", (256, 128), "diagonal"),
    ("growth", (2, 2), "quadruples"),
    ("growth", (4, 4), "doubles"),
    ("min_mib", 8.0, "LSE"),
    ("min_mib", 4 * 8 * 4096 * 64 * 4 / 2**20, "inputs"),  # O, Q, K, V: 32 MiB
    ("min_mib", (4 * 8 * 4096 * 64 + 8 * 4096) * 4 / 2**20, "inputs"),  # and the LSE
    ("min_mib", (8 * 4096 * 64 + 8 * 4096) * 4 / 1e6, "MB"),
    ("rate", GF / 25, "seconds"),
    ("causal_rate", GF / 0.014, "half"),
    ("decode_splits", (8, 1024), "tasks already"),
    ("decode_splits", (4, 1024), "not by the threads"),
    ("decode_splits", (4, 4096), "8192 / splits"),
    ("tile_kib", 128.0, "row state"),
    ("tile_kib", 132096 / 1000, "KB"),
    ("tile_kib", 129 / 2, "not 2"),
    ("claim_range", (110 / 28, 130 / 33), "fastest quartile"),
    ("claim_range", (33 / 110, 28 / 130), "over flash's"),
    ("claim_range", (4.0, 4.0), "medians"),
    ("claim_range", (130 / 28, 110 / 33), "wrong order"),
    ("claim_window", (2.5, 5.0), "divide it"),
    ("claim_window", (1.75, 4.25), "not +0.25"),
    ("claim_window", (1.5, 5.0), "x 0.8"),
    ("claim_window", (1.6, 4.0), "high end too"),
    ("claim_window", (1.6, 3.2), "multiply it"),
    ("head_dim", 64, "layers"),
    ("head_dim", 384, "slice"),
    ("gqa", (8, 4), "kv heads"),
    ("gqa", (4, 8), "smaller"),
    ("smem_kib", 32.0, "two tiles"),
    ("smem_kib", 64.0, "registers"),
    ("blocks_per_sm", 16, "thread limit"),
    ("blocks_per_sm", 228 / 48, "whole"),
]


def test_every_exercise_has_an_answer_here_and_accepts_it():
    assert set(ANSWERS) == set(exercises.EXERCISES)
    for name, answer in ANSWERS.items():
        assert exercises.check(name, answer).startswith("right"), name


def test_every_lesson_has_two_checked_exercises_and_its_notebook_asks_them():
    """Puzzles, the lessons' own exercise modules and these: at least two per lesson;
    each exercise here appears, with its check, in its lesson's notebook."""
    from collections import Counter

    from fa_lab.lessons import flex_exercises, kv_exercises, puzzles
    from fa_lab.tools import report

    count = Counter(e.lesson for e in exercises.EXERCISES.values())
    count.update(p.lesson for p in puzzles.PUZZLES.values())
    count["14_kv_cache_quantization"] += len(kv_exercises.EXERCISES)
    count["15_programmable_attention"] += len(flex_exercises.EXERCISES)
    for lesson, _ in report.NOTEBOOKS:
        assert count[lesson] >= 2, (lesson, count[lesson])
    for name, e in exercises.EXERCISES.items():
        source = (report.REPO / "notebooks" / f"{e.lesson}.ipynb").read_text()
        assert f'exercises.check(\\"{name}\\", my_answer)' in source, (e.lesson, name)


@pytest.mark.parametrize("name,answer,reading", MISTAKES)
def test_each_common_mistake_is_read_back(name, answer, reading):
    said = exercises.check(name, answer)
    assert said.startswith("not yet") and reading in said, said


@pytest.mark.parametrize("name", sorted(exercises.EXERCISES))
def test_unanswered_and_malformed_answers(name, capsys):
    assert exercises.check(name, None) == "not yet: replace None with your answer"
    assert exercises.check(name, "12").startswith("not yet: answer")
    assert exercises.check(name, True).startswith("not yet: answer")
    exercises.show(name)
    out = capsys.readouterr().out
    assert name in out and "hint:" in out


def test_unknown_exercise_is_refused_by_name():
    with pytest.raises(ValueError, match="name"):
        exercises.check("int9_row", 1.0)


def test_claim_range_takes_three_significant_digits():
    assert exercises.check("claim_range", (3.33, 4.64)).startswith("right")


def test_a_rounded_bf16_answer_is_asked_for_every_digit():
    assert "every digit" in exercises.check("bf16_round", 1.0078)
