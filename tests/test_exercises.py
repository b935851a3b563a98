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
    ("int8_row", (2 * 2.54 / 255, 28, -127, 51, 2), "asymmetric"),
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


def test_every_exercise_has_an_answer_here_and_accepts_it():
    assert set(ANSWERS) == set(exercises.EXERCISES)
    for name, answer in ANSWERS.items():
        assert exercises.check(name, answer).startswith("right"), name


def test_two_exercises_per_lesson():
    for lesson in {e.lesson for e in exercises.EXERCISES.values()}:
        assert len(exercises.names(lesson)) >= 2, lesson


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
