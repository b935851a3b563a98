"""The memory-hierarchy tools: cache sizes, stream and FMA kernels, the traffic model
against FlashAttention's IO formula. No timing asserts: the sweeps run, their numbers
are not judged here."""

import numpy as np
import pytest

import fa_lab
from fa_lab.tools import hierarchy, traffic
from fa_lab.lessons import simd
from fa_lab.__main__ import main
from fa_lab.kernels.probes import stream

KiB, MiB = 1024, 1024 * 1024


def test_cache_levels_from_sysfs_layout(tmp_path):
    for i, (level, kind, size, shared) in enumerate([(1, "Data", "32K", "0"),
                                                     (1, "Instruction", "32K", "0"),
                                                     (2, "Unified", "1024K", "0"),
                                                     (3, "Unified", "32768K", "0-1")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in [("level", level), ("type", kind), ("size", size),
                            ("shared_cpu_list", shared)]:
            (d / name).write_text(f"{value}\n")
    caches = hierarchy.cache_levels(tmp_path)
    assert [c.name for c in caches] == ["L1", "L1i", "L2", "L3"]
    assert hierarchy.data_levels(caches) == {"L1": 32 * KiB, "L2": MiB, "L3": 32 * MiB}
    assert caches[-1].shared == 2


def test_this_machine_reports_some_caches():
    levels = hierarchy.data_levels()
    assert levels and all(v > 0 for v in levels.values())
    assert list(levels.values()) == sorted(levels.values())


def test_stream_kernels_compute_what_they_claim():
    x = np.arange(1000, dtype=np.float32)
    assert stream.read_serial(x, 3) == 3 * x.sum()
    assert stream.read_parallel(x, 2, 3) == 2 * x.sum()
    a, b, c = np.zeros(101, np.float32), np.ones(101, np.float32), np.arange(101, dtype=np.float32)
    stream.triad_parallel(a, b, c, np.float32(2.0), 1, 2)
    np.testing.assert_allclose(a, 1 + 2 * c)


def test_fma_loop_is_packed_fma():
    seed = np.ones(stream.LANES, np.float32)
    stream.fma_serial(seed, 3, np.float32(1.0), np.float32(1.0))
    report = simd.vector_report(stream.fma_serial)
    assert report["packed_fma"] >= 8 and report["scalar_fma"] == 0, report


def test_bandwidth_sweep_and_levels_run():
    df = hierarchy.bandwidth_sweep([8 * KiB, 64 * KiB, 4 * MiB], repeats=1,
                                   target_bytes=MiB)
    assert len(df) == 3 * 2 * len(df["threads"].unique())
    assert (df["gbps"] > 0).all() and {"others_pct", "busy"} <= set(df.columns)
    levels = hierarchy.level_bandwidths(df, {"L1": 32 * KiB, "L2": MiB, "L3": 2 * MiB})
    assert set(levels["level"]) <= {"L1", "L2", "L3", "DRAM"} and len(levels)


def test_fma_peak_runs():
    df = hierarchy.fma_peak(repeats=1, steps=1000)
    assert (df["gflops"] > 0).all()


def test_fit_level_counts_private_levels_per_thread():
    levels = {"L1": 32 * KiB, "L2": MiB, "L3": 32 * MiB}
    assert hierarchy.fit_level(40 * KiB, levels, 2) == "L1"
    assert hierarchy.fit_level(40 * KiB, levels, 1) == "L2"
    assert hierarchy.fit_level(33 * MiB, levels, 2) == "DRAM"


def test_perf_counters_answer_either_way():
    info = hierarchy.perf_counters(nbytes=MiB, reps=1)
    assert info["available"] == (not info["reason"])
    if info["available"]:
        assert info["values"]


def test_cli_bandwidth(tmp_path, capsys):
    csv = tmp_path / "bw.csv"
    assert main(["bench", "--sweep", "bandwidth", "--max-mib", "1", "--repeats", "1",
                 "--csv", str(csv)]) == 0
    assert csv.exists() and "GB/s" in capsys.readouterr().out


# --- the traffic model ---------------------------------------------------------------

@pytest.mark.parametrize("order", ["fa1", "fa2"])
def test_flash_traffic_scales_as_n2_d2_over_m(order):
    # FlashAttention's Theorem 2: Theta(N^2 d^2 / M) when a head's K, V (or Q, O) do not
    # fit: doubling N ~quadruples it, doubling M ~halves it.
    d = 64
    t = {(N, M): traffic.io_traffic(order, N, d, M) for N in (8192, 16384)
         for M in (512 * KiB, MiB)}
    assert 3.5 <= t[16384, 512 * KiB] / t[8192, 512 * KiB] <= 4.05
    assert 0.45 <= t[8192, MiB] / t[8192, 512 * KiB] <= 0.6


def test_standard_traffic_scales_as_n2_and_ignores_m():
    d = 64
    t = {(N, M): traffic.io_traffic("standard", N, d, M) for N in (8192, 16384)
         for M in (128 * KiB, 256 * KiB)}
    assert 3.9 <= t[16384, 128 * KiB] / t[8192, 128 * KiB] <= 4.05
    assert t[8192, 256 * KiB] == t[8192, 128 * KiB]
    # FlashAttention's saving over standard attention is ~M / d^2: it grows with M.
    saving = {M: t[8192, 128 * KiB] / traffic.io_traffic("fa2", 8192, d, M)
              for M in (128 * KiB, MiB)}
    assert saving[128 * KiB] > 3 and saving[MiB] > 6 * saving[128 * KiB], saving


def test_fa1_moves_more_than_fa2_with_the_same_tiles():
    a = traffic.traffic("fa1", 4096, 4096, 64, 256 * KiB, blocks=(64, 64))
    b = traffic.traffic("tiled", 4096, 4096, 64, 256 * KiB, blocks=(64, 64))
    assert a["O"] > b["O"] and a["row state"] > b["row state"]
    assert sum(a.values()) > sum(b.values())


def test_everything_fits_gives_the_compulsory_traffic():
    for name in list(fa_lab.KERNELS) + ["numpy_standard", "torch_sdpa"]:
        t = traffic.traffic(name, 100, 100, 8, 10 ** 12)
        s = 8 if name == "reference" else 4
        assert sum(t.values()) == (4 * 100 * 8 + 100) * s, name


def test_table_covers_every_kernel_and_level():
    df = traffic.table(list(fa_lab.KERNELS), 512, 512, 64, {"L1": 32 * KiB, "L2": MiB})
    assert len(df) == 2 * len(fa_lab.KERNELS)
    assert (df["intensity"] > 0).all()


def test_cache_tiles_fit_their_level():
    df = traffic.cache_tiles({"L1": 32 * KiB, "L2": MiB}, 64)
    assert (df["tile_bytes"] <= df["M_bytes"]).all()
    l1, l2 = df.set_index("level").loc["L1"], df.set_index("level").loc["L2"]
    assert l2["Br"] * l2["Bc"] > l1["Br"] * l1["Bc"]


def test_decode_floor_reads_a_latency_table_and_divides_by_the_fitting_level(monkeypatch):
    """decode_vs_floor times nothing: it reads lesson 08's decode latencies (one
    measurement per fact) and places each against bytes(K, V) / bandwidth of its level."""
    import pandas as pd

    monkeypatch.setattr(hierarchy.numba, "get_num_threads", lambda: 2)
    levels = {"L1": 48 * KiB, "L2": 2 * MiB, "L3": 32 * MiB}
    bw = pd.DataFrame({"level": ["L2", "L3", "DRAM", "L2"], "threads": [2, 2, 2, 1],
                       "gbps": [100.0, 50.0, 10.0, 999.0]})
    lat = pd.DataFrame({"context": [1000, 1000, 100_000], "name": ["fa_lab.decode", "torch_sdpa",
                                                                   "fa_lab.decode"],
                        "H": 8, "H_kv": 2, "d": 64, "median_ms": [0.5, 0.1, 20.0],
                        "q25_ms": [0.4, 0.1, 19.0], "q75_ms": [0.6, 0.1, 22.0],
                        "others_pct": 0.5, "steal_pct": 0.0})
    dec = hierarchy.decode_vs_floor(lat, bw, levels)
    assert list(dec["tokens"]) == [1000, 100_000]  # torch's rows are not the kernel's
    small, large = dec.iloc[0], dec.iloc[1]
    assert small["kv_bytes"] == 2 * 2 * 1000 * 64 * 4 and small["level"] == "L2"
    assert small["floor_s"] == pytest.approx(small["kv_bytes"] / 100e9)  # all-thread bandwidth
    assert large["level"] == "DRAM" and large["floor_s"] == pytest.approx(large["kv_bytes"] / 10e9)
    assert large["x_floor"] == pytest.approx(20e-3 / large["floor_s"])
    assert large["x_floor_low"] == pytest.approx(19e-3 / large["floor_s"])
    assert hierarchy.load_of(large) is not None and large["others_pct"] == 0.5
    with pytest.raises(ValueError, match="latency"):
        hierarchy.decode_vs_floor(lat[lat["name"] == "torch_sdpa"], bw, levels)
