"""The process-isolated harness and the CPU speed targets (no timing is asserted: only that
each contender runs in its own validated worker, and that the table and verdicts come out)."""

import subprocess
import sys
import time

import pytest

from fa_lab.settings.machine import LoadMonitor
from fa_lab.tools.bench import cpu_targets as targets
from fa_lab.tools.bench.isolated import TIMING, time_isolated

FACTORY = "fa_lab.tools.bench.isolated:attention_call"


def test_each_contender_runs_in_its_own_validated_worker():
    t = time_isolated({"flash": (FACTORY, dict(H=2, Nq=33, Nk=40, d=8)),
                       "tiled_simd": (FACTORY, dict(H=2, Nq=33, Nk=40, d=8, causal=True,
                                                    kernel="tiled_simd"))},
                      rounds=2, calls=3, warmup=1, gap_s=0.0)
    assert sorted(t) == ["flash", "tiled_simd"]
    assert all(len(v) == 6 and min(v) > 0 for v in t.values())
    assert t.load is not None and t.load.known  # the window's load was recorded


def test_a_worker_that_fails_validation_or_setup_says_why():
    with pytest.raises(RuntimeError, match="no_such_kernel"):
        time_isolated({"bad": (FACTORY, dict(H=1, Nq=8, d=4, kernel="no_such_kernel"))},
                      rounds=1, calls=1)
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        time_isolated({"bad": ("fa_lab.no_such_module:f", {})}, rounds=1, calls=1)


def test_a_workers_cpu_counts_as_the_measurements_own():
    busy = "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass\n"
    seen = {}
    for counted in (False, True):
        child = subprocess.Popen([sys.executable, "-c", busy])
        with LoadMonitor(pids=[child.pid] if counted else ()) as mon:
            time.sleep(0.8)
        child.wait()
        seen[counted] = mon.load.others
    assert seen[False] >= 0.25, seen  # one busy core of two, counted as others' load
    assert seen[True] <= seen[False] - 0.2, seen


def test_cpu_targets_table_and_verdicts(monkeypatch):
    monkeypatch.setattr(targets, "TARGETS", [
        ("tiny", dict(H=2, Nq=40, d=16), dict(kernel="flash"), 1.0),
        ("tiny decode", dict(H=4, H_kv=2, Nq=1, Nk=70, d=16), dict(kernel="tiled_simd"), 1.0),
        ("tiny int8", dict(H=2, Nq=70, d=16), dict(kernel="int8", pv_dtype="float32"), 1.0)])
    pytest.importorskip("torch", reason="torch is the baseline")
    df, verdicts = targets.cpu_targets(rounds=1, calls=1, gap_s=0.0)
    assert list(df["case"]) == ["tiny", "tiny decode", "tiny int8"] and len(verdicts) == 3
    assert df["fa_lab"].iloc[2].startswith("int8 ")  # names the INT8 kernel auto chose
    assert (df["timing"] == TIMING).all()
    assert ((df["ratio_low"] <= df["ratio"]) & (df["ratio"] <= df["ratio_high"])).all()
    assert set(df["verdict"]) <= {"met", "not met", "inconclusive"}
