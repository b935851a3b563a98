"""bench --sweep features runs, validates and judges (no timing is asserted here: speed
targets are benchmark verdicts, not tests)."""

import pytest

from fa_lab.tools.bench import features as bench_features
from fa_lab.__main__ import main


def test_quick_features_table_has_every_study_and_a_verdict(capsys):
    df = bench_features.feature_studies(quick=True, repeats=2)
    assert set(df["study"]) == {"window", "varlen", "paged"}
    judged = df.dropna(subset=["verdict"])
    assert {"window", "varlen", "paged"} <= set(judged["study"])
    assert judged["verdict"].str.match(r"(met|not met|inconclusive)").all()
    assert {"others_pct", "steal_pct", "q25_ms", "q75_ms"} <= set(df.columns)
    assert (df["q25_ms"] <= df["q75_ms"]).all()


def test_models_of_the_work():
    # pairs: N (N + 1) / 2 for causal; a left window of w sees at most w + 1 keys
    assert bench_features.visible_pairs(10) == 55
    assert bench_features.visible_pairs(10, (2, 0)) == 1 + 2 + 3 * 8
    assert bench_features.visible_pairs(8192) / bench_features.visible_pairs(8192, (256, 0)) \
        == pytest.approx(16.0, rel=0.03)
    assert bench_features.tiles_visited(1024, (-1, -1), True, 256, 256) == 10
    assert bench_features.tiles_visited(1024, (256, 0), True, 256, 256) == 1 + 2 * 3


def test_validation_catches_a_wrong_kernel(monkeypatch):
    # the study validates before timing: a window kernel that ignores the window fails
    real = bench_features.attention

    def ignores_window(*a, window=None, **kw):
        return real(*a, **kw)

    monkeypatch.setattr(bench_features, "attention", ignores_window)
    with pytest.raises(AssertionError):
        bench_features.window_study(N=300, H=1, d=8, repeats=1, window=(16, 0))


def test_cli_sweep_features_prints_every_figure(capsys, tmp_path):
    assert main(["bench", "--sweep", "features", "--quick", "--repeats", "2", "--csv",
                 str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    for needle in ("window", "varlen (packed)", "padded batch", "paged cache", "pairs_ratio",
                   "tiles_ratio", "verdict", "others_pct"):
        assert needle in out
    assert (tmp_path / "f.csv").exists()
