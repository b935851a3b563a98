"""Benchmarks run (no timing is asserted: only that the harness works and validates)."""

import numpy as np
import pytest

from fa_lab.tools import bench
from fa_lab.__main__ import main
from fa_lab.settings.machine import describe_machine
from fa_lab.numerics.testing import Case, ToleranceError


def test_run_returns_a_table_with_machine_and_flops():
    df = bench.run(["naive", "tiled_simd"], [Case(B=1, H=2, Nq=33, Nk=40, d=8)],
                   causal=True, repeats=2)
    assert set(df["name"]) >= {"naive", "tiled_simd", "numpy_standard"}
    row = df[df["name"] == "naive"].iloc[0]
    assert row["Nk"] == 40 and row["repeats"] == 2 and row["machine_cpu"]
    assert row["gflops"] == pytest.approx(bench.flops(1, 2, 33, 40, 8, True) /
                                          row["median_s"] / 1e9)
    assert (df["q25_s"] <= df["median_s"]).all() and (df["median_s"] <= df["q75_s"]).all()
    assert (df["timing"] == bench.TIMING_INTERLEAVED).all()  # each row says how it was timed


def test_flop_model():
    assert bench.flops(1, 8, 1024, 1024, 64) == 4 * 8 * 1024 * 1024 * 64
    assert bench.flops(2, 1, 10, 20, 4, causal=True) == 2 * 10 * 20 * 4 * 2


def test_validation_rejects_a_wrong_kernel():
    wrong = bench.Contender("wrong", lambda q, k, v: np.zeros_like(q) + 1e-3, "kernel")
    q, k, v = Case(Nq=9, d=4).inputs(np.float32)
    with pytest.raises(ToleranceError):
        bench.validate(wrong, q, k, v)


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="unknown kernel"):
        bench.contenders(["nope"])


def test_cli_bench_writes_csv_and_png(tmp_path, capsys):
    csv, png = tmp_path / "b.csv", tmp_path / "b.png"
    assert main(["bench", "--kernels", "online", "tiled", "--N", "20", "--H", "2", "--d", "8",
                 "--repeats", "2", "--csv", str(csv), "--png", str(png)]) == 0
    assert csv.stat().st_size > 0 and png.stat().st_size > 0
    assert describe_machine()


def test_cli_machine(capsys):
    assert main(["machine"]) == 0
    assert "numba" in capsys.readouterr().out


def test_sweep_blocks_validates_and_times_every_combination():
    case = Case(B=1, H=2, Nq=40, d=8)
    df = bench.sweep_blocks("tiled_simd", case, [8, 16], [4, 32], causal=True, repeats=2)
    assert list(zip(df["block_q"], df["block_kv"])) == [(8, 4), (8, 32), (16, 4), (16, 32)]
    assert (df["repeats"] == 2).all()
    assert ((df["q25_s"] <= df["median_s"]) & (df["median_s"] <= df["q75_s"])).all()
    work = bench.flops(1, 2, 40, 40, 8, causal=True)
    np.testing.assert_allclose(df["gflops"], work / df["median_s"] / 1e9)
    with pytest.raises(ValueError, match="not tiled"):
        bench.sweep_blocks("naive", Case(), [8], [8])


def test_thread_scaling_restores_the_thread_count_and_divides_by_one_thread():
    import numba

    before = numba.get_num_threads()
    most = numba.config.NUMBA_NUM_THREADS
    # the 1-thread row last: the speedup must be relative to it, not to the first row
    df = bench.thread_scaling("tiled_simd", Case(B=1, H=2, Nq=40, d=8),
                              threads=[most, 1], repeats=2)
    assert numba.get_num_threads() == before
    assert list(df["threads"]) == ([most, 1] if most > 1 else [1])
    one = df.loc[df["threads"] == 1, "median_s"].iloc[0]
    np.testing.assert_allclose(df["speedup_vs_1"], one / df["median_s"])
    slack = 1 + 1e-9  # rounding only
    assert ((df["speedup_low"] <= df["speedup_vs_1"] * slack)
            & (df["speedup_vs_1"] <= df["speedup_high"] * slack)).all()


def test_time_apart_times_torch_in_rounds_of_its_own_after_the_others():
    """Back-to-back timing never runs a contender right after torch's calls: torch's
    rounds come after every other contender's, in a window of their own."""
    from fa_lab.tools.bench.harness import Contender, time_apart

    calls = []
    cs = [Contender(n, (lambda n=n: calls.append(n)), "kernel")
          for n in ("torch_sdpa", "flash", "sage")]
    times = time_apart(cs, (), repeats=3, warmup=1, cooldown=0)
    assert set(times) == {"torch_sdpa", "flash", "sage"}
    assert all(len(t) == 3 for t in times.values()) and times.load is not None
    first_torch = calls.index("torch_sdpa")
    assert set(calls[:first_torch]) == {"flash", "sage"}
    assert set(calls[first_torch:]) == {"torch_sdpa"}
