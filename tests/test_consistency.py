"""The consistency checks fire on planted contradictions, stay quiet on numbers that
agree, say inconclusive on a busy machine, refuse bad input by name, and the report's
index lists every one that fired."""

import pytest

from fa_lab.numerics import consistency as cc
from fa_lab.settings.machine import Load

BUSY = Load(1.0, 2.0, 2.0, 0.5, 0.0)  # others took half the CPU


@pytest.mark.parametrize("check,planted,agreeing", [
    (cc.fraction_of_peak, dict(rate=1210, peak=1000), dict(rate=1040, peak=1000)),
    (cc.above_floor, dict(seconds=0.9e-3, floor_seconds=1e-3),
     dict(seconds=1.1e-3, floor_seconds=1e-3)),
    (cc.same_configuration, dict(a=10e-3, b=25e-3, where_a="cell 8", where_b="cell 23"),
     dict(a=10e-3, b=12e-3, where_a="cell 8", where_b="cell 23")),
    (cc.baseline_beats, dict(baseline_seconds=30e-3, rung_seconds=20e-3, baseline="torch",
                             rung="tiled_simd"),
     dict(baseline_seconds=10e-3, rung_seconds=20e-3, baseline="torch", rung="tiled_simd")),
    (cc.planner_choice, dict(chosen="1 split", seconds={"1 split": 1.85e-3, "8 splits": 1e-3}),
     dict(chosen="8 splits", seconds={"1 split": 1.85e-3, "8 splits": 1e-3})),
])
def test_checks_fire_on_planted_contradictions_only(check, planted, agreeing):
    fired = check("planted", **planted)
    assert fired.status == cc.SUSPICIOUS and fired.text.startswith("suspicious (")
    assert cc.is_suspicious(fired.row())
    quiet = check("agreeing", **agreeing)
    assert quiet.status == cc.CONSISTENT and not cc.is_suspicious(quiet.row())
    busy = check("busy", **planted, load=BUSY)
    assert busy.status == "inconclusive" and busy.busy


def test_the_numbers_that_disagree_are_in_the_text():
    v = cc.fraction_of_peak("Q K^T", 1210, 1000)
    assert "1,210" in v.text and "121%" in v.text and "1,000" in v.text
    v = cc.above_floor("decode", 0.9e-3, 1e-3)
    assert "0.9 ms" in v.text and "1 ms" in v.text and "0.90x" in v.text


@pytest.mark.parametrize("call,match", [
    (lambda: cc.fraction_of_peak("x", 1.0, 0.0), "peak"),
    (lambda: cc.above_floor("x", 1.0, float("nan")), "floor_seconds"),
    (lambda: cc.same_configuration("x", -1.0, 1.0, where_a="a", where_b="b"), "a"),
    (lambda: cc.baseline_beats("x", 1.0, 0.0, baseline="b", rung="r"), "rung_seconds"),
    (lambda: cc.planner_choice("x", "c", {"a": 1.0}), "chosen"),
    (lambda: cc.planner_choice("x", "a", {"a": 1.0, "b": 0.0}), "seconds"),
    (lambda: cc.fraction_of_peak("x", float("nan"), 1.0), "rate"),
    (lambda: cc.above_floor("x", float("nan"), 1.0), "seconds"),
    (lambda: cc.same_configuration("x", 1.0, 1.0, where_a="a", where_b="b", apart=0.5), "apart"),
    (lambda: cc.planner_choice("x", "a", {"a": 1.0}, slack=0.9), "slack"),
    (lambda: cc.planner_choice("x", "a", {"a": 1.0, "b": 2.0}, ranges={"a": (1, 1)}), "ranges"),
])
def test_bad_input_is_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_index_lists_the_checks_that_fired():
    from fa_lab.tools import report

    fired = cc.above_floor("decode H=8 below its floor", 0.9e-3, 1e-3).row()
    quiet = cc.fraction_of_peak("P V", 500, 1000).row()
    results = [report.Result("08_decoding_and_retrieval", "ok", 1.0,
                             lesson={"verdicts": [fired, quiet]}),
               report.Result("09_memory_hierarchy", "ok", 1.0, lesson={"verdicts": [quiet]})]
    index = report.index_html(results, {"cpu": "x"}, {}, {})
    section = index.split("Consistency checks")[1]
    assert "decode H=8 below its floor" in section and "08_decoding_and_retrieval" in section
    assert "P V" not in section.split("<h2>")[0]
    clean = report.index_html(results[1:], {"cpu": "x"}, {}, {})
    assert "none of the 1 checks that gave a verdict fired" in clean


def test_a_planner_beaten_within_the_spread_is_inconclusive_not_suspicious():
    times = {"1 split": 1.2e-3, "2 splits": 1.0e-3}
    overlap = {"1 split": (1.0e-3, 1.4e-3), "2 splits": (0.9e-3, 1.1e-3)}
    apart = {"1 split": (1.15e-3, 1.25e-3), "2 splits": (0.95e-3, 1.05e-3)}
    assert cc.planner_choice("p", "1 split", times, ranges=overlap).status == "inconclusive"
    assert cc.planner_choice("p", "1 split", times, ranges=apart).status == cc.SUSPICIOUS
    assert cc.planner_choice("p", "2 splits", times, ranges=overlap).status == cc.CONSISTENT
