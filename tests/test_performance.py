"""The performance machinery: split-KV (Flash-Decoding), the fused softmax block, the
staged driver, the autotuner, the claims check and the benchmark helpers.

Correctness and behaviour only: no test asserts a time (timings live in the report).
"""

import json

import numpy as np
import pytest

from fa_lab.tools import bench, tune
from fa_lab.settings import config
from fa_lab.numerics import reference
from fa_lab.lessons import simd
from fa_lab.__main__ import main
from fa_lab.api import plan, prepare
from fa_lab.settings.config import SPLIT_MIN_KEYS
from fa_lab.kernels.ladder import flash
from fa_lab.numerics.testing import Case, assert_close

from conftest import check_against_reference


def _run_flash(q, k, v, *, causal=False, mask=None, splits=None, stage=3, block_kv=None):
    return prepare(q, k, v, causal=causal, mask=mask, block_kv=block_kv).run(
        "flash", splits=splits, stage=stage)


def _expect(q, k, v, out, lse, **opts):
    exp_out, exp_lse = reference.attention(q, k, v, **opts)
    base_out, base_lse = reference.attention(q, k, v, dtype=q.dtype.type, **opts)
    assert_close(out, exp_out, baseline=base_out, what="flash split-KV out",
                 magnitude=np.abs(v).max())
    finite = np.isfinite(exp_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], exp_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_split_kv_matches_the_reference(splits, causal, dtype):
    # Awkward: GQA, Nq != Nk, Nk not a multiple of the key block, more splits than
    # some rows can see (top-left causal: early rows see nothing of late splits).
    case = Case(B=2, H=4, H_kv=2, Nq=5, Nk=301, d=12)
    q, k, v = case.inputs(dtype=dtype, seed=3)
    out, lse = _run_flash(q, k, v, causal=causal, splits=splits, block_kv=32)
    _expect(q, k, v, out, lse, causal=causal)


def test_split_kv_fully_masked_rows_and_nan_rows():
    q, k, v = Case(B=1, H=2, Nq=4, Nk=200, d=8).inputs(seed=5)
    mask = np.ones((1, 2, 4, 200), bool)
    mask[0, 1, 2] = False  # a fully masked row: zeros and lse = -inf
    mask[0, 0, 1, :150] = False  # visible only in the last split
    q[0, 0, 3, 0] = np.nan  # a NaN query row: that row NaN, the others exact
    out, lse = _run_flash(q, k, v, mask=mask, splits=4, block_kv=16)
    assert np.all(out[0, 1, 2] == 0) and lse[0, 1, 2] == -np.inf
    assert np.isnan(out[0, 0, 3]).all() and np.isnan(lse[0, 0, 3])
    keep = np.ones(out.shape[:-1], bool)
    keep[0, 0, 3] = False
    exp_out, _ = reference.attention(q, k, v, mask=mask)
    base_out, _ = reference.attention(q, k, v, mask=mask, dtype=np.float32)
    assert_close(out[keep], exp_out[keep], baseline=base_out[keep], what="split-KV rows")


def test_split_and_unsplit_agree_to_rounding():
    q, k, v = Case(B=1, H=3, Nq=1, Nk=2000, d=64).inputs(seed=1)
    one, lse1 = _run_flash(q, k, v, causal="bottom_right", splits=1)
    four, lse4 = _run_flash(q, k, v, causal="bottom_right", splits=4)
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse4, lse1, rtol=1e-6)


def test_api_uses_split_kv_for_a_single_decode_row():
    q, k, v = Case(B=1, H=1, Nq=1, Nk=1500, d=16).inputs(seed=2)
    p = plan(q, k, v, causal="bottom_right", kernel="flash")
    assert p["splits"] > 1 and p["kernel"] == "flash"
    check_against_reference("flash", q, k, v, causal="bottom_right")


def test_plan_splits_rules():
    # Enough (b, h, query block) tasks: no split.
    assert flash.plan_splits(1, 8, 2048, 2048, 256, 256, threads=2) == 1
    # One decode row, long cache: split so each thread gets work, >= SPLIT_MIN_KEYS each.
    s = flash.plan_splits(1, 1, 1, 8192, 1, 256, threads=2)
    assert 1 < s <= 8192 // SPLIT_MIN_KEYS
    # Too short to be worth it.
    assert flash.plan_splits(1, 1, 1, SPLIT_MIN_KEYS, 1, 256, threads=2) == 1
    assert flash.plan_splits(0, 1, 1, 8192, 1, 256, threads=2) == 1


def test_fused_softmax_block_matches_numpy_including_masked_and_nan_rows():
    rng = np.random.default_rng(0)
    S = (rng.standard_normal((6, 37)) * 20).astype(np.float32)
    S[1] = -np.inf  # fully masked so far
    S[2, 5:] = -np.inf
    S[3, 7] = np.nan
    S[4, :] = -200.0  # exp underflows for a fixed max: must still normalize
    m = np.full(6, -np.inf, np.float32)
    m[5] = 50.0  # a previous block had a larger max: alpha = 1, P scaled down
    l = np.where(m > -np.inf, 2.0, 0.0).astype(np.float32)
    got = [m.copy(), l.copy(), np.empty(6, np.float32), np.empty_like(S)]
    want = [m.copy(), l.copy(), np.empty(6, np.float32), np.empty_like(S)]
    flash._softmax_block_f32(S, *got)
    flash.softmax_block(S, *want)  # called from Python: the NumPy body
    # P <= 1: absolute error is what matters (the float32 range reduction t = y log2 e
    # costs relative accuracy only for tiny probabilities, exp(-40) ~ 4e-18).
    for g, w, name in zip(got, want, ["m", "l", "alpha", "P"]):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=3e-8, err_msg=name)
    assert np.isnan(got[3][3]).all() and np.isnan(got[1][3])
    assert np.all(got[3][1] == 0) and got[1][1] == 0 and got[0][1] == -np.inf


def test_fused_softmax_block_is_vectorized():
    S = np.zeros((4, 32), np.float32)
    flash._softmax_block_f32(S, np.zeros(4, np.float32), np.zeros(4, np.float32),
                             np.zeros(4, np.float32), S.copy())
    asm = simd.assembly(flash._softmax_block_f32)
    assert len(simd.PACKED_FMA.findall(asm)) >= 4  # the polynomial, 8 or 16 lanes
    assert "vpmaxsd" in asm  # the row max as a packed int32 max, not scalar float


def test_staged_driver_stage3_is_the_kernel():
    q, k, v = Case(B=1, H=2, Nq=70, Nk=90, d=16).inputs(seed=4)
    full, _ = _run_flash(q, k, v, causal=True)
    staged, _ = _run_flash(q, k, v, causal=True, splits=1, stage=3)
    np.testing.assert_array_equal(full, staged)
    zero, _ = _run_flash(q, k, v, causal=True, splits=1, stage=2)  # no P V: l > 0, acc 0
    assert np.all(zero == 0)


def test_breakdown_times_each_stage_of_the_real_kernel(monkeypatch):
    # The harness is replaced by one that runs each contender once (so each staged call
    # really runs) and returns known times: stage s takes (s + 1)^2 ms. The parts must
    # be the differences in the kernel's order, stage by stage.
    from fa_lab.tools.bench import studies
    from fa_lab.settings.machine import Load

    seen = []

    def fake_time_calls(cs, args, **kw):
        times = bench.Timings()
        for c in cs:
            out, _ = c.fn(*args)
            seen.append((c.name, bool(np.all(out == 0))))
            times[c.name] = [((int(c.name[-1]) + 1) ** 2) / 1e3]
        times.load = Load(0.0, 0.0, 0.0, 0.0, 0.0)
        return times

    monkeypatch.setattr(studies, "time_calls", fake_time_calls)
    df = bench.breakdown(Case(B=1, H=2, Nq=64, d=16), repeats=2)
    assert list(df["part"]) == list(bench.BREAKDOWN_PARTS)
    np.testing.assert_allclose(df["ms"], [1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(df["share"], np.array([1, 3, 5, 7]) / 16)
    assert df["total_ms"].iloc[0] == pytest.approx(16.0)
    # stages 0-2 stop before P V (a zero output); stage 3 is the whole kernel
    assert seen == [("stage0", True), ("stage1", True), ("stage2", True), ("stage3", False)]


def test_decode_splits_validates_every_contender():
    df = bench.decode_splits(B=1, H=2, H_kv=1, Nk=700, d=8, splits=(1, 2), repeats=2)
    assert {"flash, 1 split", "flash, 2 splits"} <= set(df["name"])
    assert ((df["q25_ms"] <= df["median_ms"]) & (df["median_ms"] <= df["q75_ms"])).all()
    assert (df["H_kv"] == 1).all()
    assert (df["timing"] == bench.TIMING_APART).all() and "torch_sdpa" in bench.TIMING_APART
    bk = min(config.FLASH_BLOCKS[1], 700)
    assert (df["auto_splits"] == flash.plan_splits(1, 2, 1, 700, 1, bk,
                                                   config.num_threads())).all()


def test_matmul_peak_reports_both_blas_paths():
    df = bench.matmul_peak(n=128, repeats=1, block=64)
    assert set(df["name"]) == {"numpy_matmul", "blas_tiles_per_thread"}
    row = df.set_index("name").loc["numpy_matmul"]
    assert row["gflops"] == pytest.approx(2 * 128 ** 3 / row["median_s"] / 1e9)
    assert row["shape"] == "128x128" and df["machine_blas"].iloc[0]


def test_torch_baseline_gets_bottom_right_right():
    pytest.importorskip("torch")
    q, k, v = Case(B=1, H=2, Nq=3, Nk=9, d=8).inputs(seed=0)
    [sdpa] = [c for c in bench.contenders([], causal="bottom_right") if c.name == "torch_sdpa"]
    bench.validate(sdpa, q, k, v, "bottom_right")  # raises if torch used top-left


def test_claims_check_judges_every_row_on_its_range(tmp_path):
    df = bench.check_speed_claims(repeats=2, max_N=32)
    assert (df["speedup low"] <= df["speedup vs standard"]).all()
    assert (df["speedup vs standard"] <= df["speedup high"]).all()
    assert set(df["status"]) <= {"consistent", "understated", "overstated here", "inconclusive"}
    claims = __import__("pandas").read_csv(bench.SPEED_CLAIMS_CSV)
    assert len(df) == len(claims) and df["verdict"].str.len().min() > 0
    assert df["note"].str.contains("quick run").any()
    assert list(df["claimed low"]) == list(claims["claimed_speedup_low"])
    assert list(df["claimed high"]) == list(claims["claimed_speedup_high"])
    from fa_lab import viz

    fig = viz.plot_claims(df, 1.25)  # one row per claim: widened band, claimed band, measured
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == len(df) and len(ax.patches) == 2 * len(df)
    widened = ax.patches[0]
    assert widened.get_x() == pytest.approx(df["claimed low"].iloc[0] / 1.25)
    assert widened.get_x() + widened.get_width() == pytest.approx(df["claimed high"].iloc[0] * 1.25)


def test_targets_table_logic():
    import pandas as pd

    rows = []
    for name, t in (("flash", 1.0), ("torch_sdpa", 1.5)):
        for causal in (False, True):
            rows.append({"name": name, "B": 1, "H": 8, "Nq": 2048, "causal": causal,
                         "median_s": t, "gflops": 100.0 / t})
    rows.append({"name": "flash", "B": 1, "H": 8, "Nq": 512, "causal": False,
                 "median_s": 1.0, "gflops": 50.0})
    rows.append({"name": "torch_sdpa", "B": 1, "H": 8, "Nq": 512, "causal": False,
                 "median_s": 0.9, "gflops": 60.0})
    dec = pd.DataFrame([{"name": "flash, 1 split", "median_ms": 1.0, "auto_splits": 1,
                         "H": 8, "H_kv": 8, "Nk": 4096},
                        {"name": "torch_sdpa", "median_ms": 0.5, "auto_splits": 1,
                         "H": 8, "H_kv": 8, "Nk": 4096}])
    peak = pd.DataFrame([{"gflops": 150.0}, {"gflops": 120.0}])
    t = bench.targets_table(pd.DataFrame(rows), [dec], peak).set_index("target")
    met = dict(zip(t.index, t["met"]))
    assert met["throughput vs torch SDPA, B=1, H=8, N=2048"]  # 1.5x
    assert not met["throughput vs torch SDPA, B=1, H=8, N=512"]  # 0.9x
    assert not [v for k, v in met.items() if k.startswith("decode")][0]  # 0.5x
    frac = [k for k in met if k.startswith("fraction")][0]
    assert bool(met[frac])  # 100 / 150 = 67%


def test_autotune_stores_a_choice_that_auto_uses(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setenv("FA_LAB_TUNE_FILE", str(path))
    tune.reset_cache()
    q, k, v = Case(B=1, H=2, Nq=200, Nk=200, d=16).inputs()
    assert plan(q, k, v)["blocks_from"] == "default"
    df = tune.autotune("flash", ["short"], quick=True, repeats=1)
    assert df["chosen"].sum() >= 1 and path.exists()
    stored = json.loads(path.read_text())
    choice = stored["choices"]["flash"]["short"]
    p = plan(q, k, v)
    assert p["blocks_from"] == "tuned"
    assert (p["block_q"], p["block_kv"]) == (min(choice["block_q"], 200),
                                             min(choice["block_kv"], 200))
    # an explicit kernel keeps its documented defaults; given blocks win over both
    assert plan(q, k, v, kernel="flash")["blocks_from"] == "default"
    assert plan(q, k, v, block_q=16)["blocks_from"] == "given"
    check_against_reference("auto", q, k, v)  # the tuned blocks compute the right thing
    # a choice made on another machine is ignored
    stored["fingerprint"]["cpu"] = "some other CPU"
    path.write_text(json.dumps(stored))
    assert plan(q, k, v)["blocks_from"] == "default"
    tune.reset_cache()


def test_autotune_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tiled kernel"):
        tune.autotune("naive")
    with pytest.raises(ValueError, match="unknown"):
        tune.autotune("flash", ["huge"])


def test_regimes_cover_every_length():
    assert tune.regime_for(1).name == "decode"
    assert tune.regime_for(17).name == "short"
    assert tune.regime_for(10 ** 7).name == "long"


def test_coretype_hint(monkeypatch):
    from fa_lab.settings import blas as _blas

    monkeypatch.setattr(_blas, "cpu_flags", lambda: set(_blas.SKYLAKEX_FLAGS))
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert "SkylakeX" in _blas.coretype_hint()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SkylakeX")
    assert _blas.coretype_hint() is None
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert _blas.coretype_hint() is None  # OpenBLAS detects the CPU itself
    monkeypatch.setattr(_blas, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert _blas.coretype_hint() is None


@pytest.mark.parametrize("sweep,extra", [
    ("decode", ["--H", "2", "--Nk", "600", "--d", "8"]),
    ("breakdown", ["--N", "64", "--H", "2", "--d", "8"]),
    ("blocks", ["--N", "64", "--H", "2", "--d", "8", "--blocks", "16x32", "32x32"]),
    ("threads", ["--N", "64", "--H", "2", "--d", "8"]),
    ("peak", []),
])
def test_cli_sweeps(sweep, extra, tmp_path, monkeypatch):
    if sweep == "peak":  # the CLI's 2048^2 product is slow for a test: shrink it
        monkeypatch.setattr(bench, "matmul_peak", lambda **kw: _REAL_PEAK(n=128, block=64,
                                                                          repeats=1))
    csv = tmp_path / "x.csv"
    assert main(["bench", "--sweep", sweep, "--repeats", "2", *extra, "--csv", str(csv)]) == 0
    assert csv.stat().st_size > 0


_REAL_PEAK = bench.matmul_peak


def test_cli_tune(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FA_LAB_TUNE_FILE", str(tmp_path / "t.json"))
    tune.reset_cache()
    assert main(["tune", "--quick", "--regimes", "decode", "--repeats", "1"]) == 0
    assert "decode" in capsys.readouterr().out
    tune.reset_cache()
