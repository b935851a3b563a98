"""The one verdict rule, the load monitor, and how lessons and the report carry them."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from fa_lab.settings import machine
from fa_lab.tools import report
from fa_lab.numerics import verdict
from fa_lab.settings.machine import Load
from fa_lab.lessons.notebook import setup

QUIET = Load(1.0, 0.1, 0.1, 0.01, 0.0)
BUSY = Load(1.0, 1.9, 2.1, 0.45, 0.0)


@pytest.mark.parametrize("value, low, high, need, status", [
    (1.5, 1.3, 1.7, 1.2, "met"),            # whole range above
    (1.1, 1.0, 1.15, 1.2, "not met"),       # whole range below
    (1.25, 1.1, 1.4, 1.2, "inconclusive"),  # straddles: the median alone would say met
    (1.3, None, None, 1.3, "met"),          # deterministic, on the bound
])
def test_judge_at_least_uses_the_quartile_range(value, low, high, need, status):
    v = verdict.judge("x", value, need, low=low, high=high, load=QUIET)
    assert v.status == status, v.text
    assert "quartile range" in v.text or low is None


def test_judge_at_most_and_bands():
    assert verdict.judge("m", 3.0, 4.0, at_least=False).status == "met"
    assert verdict.judge("m", 5.0, 4.0, at_least=False).status == "not met"
    assert verdict.judge("r", 2.8, (2.0, 3.5), low=2.5, high=3.1).status == "met"
    assert verdict.judge("r", 4.0, (2.0, 3.5), low=3.7, high=4.2).status == "not met"
    assert verdict.judge("r", 3.4, (2.0, 3.5), low=3.2, high=3.8).status == "inconclusive"


def test_busy_machine_makes_every_verdict_inconclusive():
    v = verdict.judge("x", 10.0, 1.0, low=9.0, high=11.0, load=BUSY)
    assert v.status == "inconclusive" and v.busy and "machine busy" in v.text
    c = verdict.judge_claim("c", 3.0, 2.0, 4.0, load=BUSY)
    assert c.status == "inconclusive" and c.busy


def test_claims_judged_on_the_range_with_one_slack():
    s = verdict.CLAIM_SLACK
    assert verdict.judge_claim("c", 3.0, 2, 4, low=2.5, high=3.5).status == "consistent"
    assert verdict.judge_claim("c", 9.0, 2, 4, low=8.0, high=10.0).status == "understated"
    assert verdict.judge_claim("c", 1.1, 2, 4, low=1.0, high=1.2).status == "overstated here"
    # a range reaching past the widened edge cannot decide: a run-to-run flip before
    edge = 4 * s
    assert verdict.judge_claim("c", edge, 2, 4, low=0.9 * edge, high=1.1 * edge).status == "inconclusive"
    assert verdict.judge_claim("m", 16.5, 16, 16).status == "consistent"  # bytes: no spread
    assert verdict.judge_claim("m", 16 * s * 1.01, 16, 16).status == "understated"


def test_ratio_range_brackets_the_ratio_of_medians():
    rng = np.random.default_rng(0)
    slow, fast = 2.0 + 0.1 * rng.standard_normal(9), 1.0 + 0.05 * rng.standard_normal(9)
    low, value, high = verdict.ratio_range(slow, fast)
    assert low < value < high
    assert value == pytest.approx(np.median(slow) / np.median(fast))
    assert low == pytest.approx(np.percentile(slow, 25) / np.percentile(fast, 75))


def test_load_monitor_sees_another_process_spinning():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        with machine.LoadMonitor() as mon:
            time.sleep(1.5)
    finally:
        hog.kill()
        hog.wait()
    load = mon.load
    if not load.known:
        pytest.skip("no /proc/stat here")
    # one spinning core of os.cpu_count(): its whole share, less what the scheduler lent others
    assert load.others > 0.5 / (os.cpu_count() or 1), load
    assert load.busy and "other processes" in load.reason
    assert machine.LOG[-1] is load


def test_own_cpu_time_is_subtracted(monkeypatch):
    """The arithmetic, with /proc/stat and getrusage replaced: 2 cores, a 1 s window."""
    stat = iter([(100.0, 0.0, 400.0), (101.6, 0.1, 402.0)])  # busy, steal, total (seconds)
    own = iter([10.0, 11.0])  # this process used 1.0 CPU-second of the 1.6 busy
    monkeypatch.setattr(machine, "_proc_stat", lambda: next(stat))
    monkeypatch.setattr(machine, "_own_cpu", lambda: next(own))
    monkeypatch.setattr(machine.config, "MIN_LOAD_WINDOW_S", 0.0)
    with machine.LoadMonitor() as mon:
        pass
    # others: (1.6 - 1.0) of 2.0 CPU-seconds; steal 0.1 of 2.0
    assert mon.load.others == pytest.approx(0.3)
    assert mon.load.steal == pytest.approx(0.05)
    assert mon.load.busy  # 0.3 > BUSY_OTHERS
    stat = iter([(100.0, 0.0, 400.0), (101.0, 0.0, 402.0)])
    own = iter([10.0, 11.0])  # all the busy time was this process's own
    with machine.LoadMonitor() as mon:
        pass
    assert mon.load.others == 0.0 and not mon.load.busy


def test_short_windows_are_padded_to_enough_ticks(monkeypatch):
    waits = []
    monkeypatch.setattr(machine.time, "sleep", waits.append)  # record the idle pad, do not wait
    with machine.LoadMonitor():
        pass  # a few microseconds of work: far below one /proc/stat tick
    assert len(waits) == 1 and waits[0] > 0.9 * machine.config.MIN_LOAD_WINDOW_S
    waits.clear()
    monkeypatch.setattr(machine.config, "MIN_LOAD_WINDOW_S", 0.0)
    with machine.LoadMonitor():
        pass
    assert waits == []  # a long enough window is not padded


def test_merge_is_busy_when_any_window_was():
    assert Load.merge([QUIET, BUSY, QUIET]).busy
    assert not Load.merge([QUIET, QUIET]).busy
    assert not Load.merge([]).known


def test_lesson_records_verdicts_and_load_for_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FA_LAB_RESULTS_DIR", str(tmp_path))
    lesson = setup("99_demo", quick=True)
    machine.LOG.append(BUSY)
    lesson.verdict("budget", 2.0, 1.0)
    status = json.loads((tmp_path / "data" / "99_demo_status.json").read_text())
    assert status["verdicts"][0]["status"] == "met"
    assert status["busy_windows"] == 1 and "under load" in status["load"]
    r = report.Result("99_demo", "ok", lesson=status)
    assert r.busy and r.verdicts == "1 met"
    page = report.index_html([r], {"cpu": "x"}, {}, {})
    assert "Measured under load" in page and "99_demo" in page


def test_a_lesson_reads_a_table_measured_earlier_in_the_same_run_only(tmp_path, monkeypatch, capsys):
    """One measurement per fact: lesson B reads lesson A's table when A ran earlier in
    this report run, in the same mode, at the same configuration; else B measures itself."""
    import pandas as pd

    monkeypatch.setenv("FA_LAB_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("FA_LAB_RUN", "run-1")
    a = setup("98_first", quick=True)
    a.save_table(pd.DataFrame({"name": ["flash", "naive"], "H": [8, 8], "Nq": [64, 64],
                               "median_s": [0.1, 2.0]}), "ladder")
    b = setup("99_second", quick=True)
    got = b.from_run("98_first", "ladder", H=8, Nq=64)
    assert list(got["name"]) == ["flash", "naive"] and list(got["median_s"]) == [0.1, 2.0]
    assert "Read from lesson 98_first" in capsys.readouterr().out
    assert b.from_run("98_first", "ladder", H=8, Nq=128) is None  # another shape
    assert b.from_run("98_first", "ladder", name=["naive", "flash"]) is not None  # exactly these
    assert b.from_run("98_first", "ladder", name=["flash"]) is None  # not only these
    assert b.from_run("98_first", "ladder", name=("flash", "naive", "tiled")) is None
    assert b.from_run("98_first", "ladder", Nk=64) is None  # a column it lacks
    assert b.from_run("98_first", "other") is None  # a table it did not save
    assert b.from_run("97_absent", "ladder") is None
    full = setup("99_full", quick=False)
    full.quick = False  # (the tests run in quick mode: FA_LAB_QUICK=1)
    assert full.from_run("98_first", "ladder", H=8) is None  # another mode
    monkeypatch.setenv("FA_LAB_RUN", "run-2")  # a later run: A's table is stale
    assert b.from_run("98_first", "ladder", H=8) is None
    setup("98_first", quick=True)  # A runs again in run-2 but fails before saving it
    assert b.from_run("98_first", "ladder", H=8) is None
    monkeypatch.delenv("FA_LAB_RUN")  # outside a report (JupyterLab): always measure
    assert b.from_run("98_first", "ladder", H=8) is None
