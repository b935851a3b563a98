"""The lessons' sliders: each view draws from the library on awkward sizes; explore()
draws once in the report and under nbval, gives sliders otherwise, and refuses a
control its view does not have."""

import sys
import types

import matplotlib
import pytest

from fa_lab.lessons import play

VIEWS = [
    (play.tiles, dict(N=1, block=64, causal=True, window=0)),
    (play.tiles, dict(N=301, block=48, causal=False, window=100)),
    (play.quant_error, dict(granularity="per_tensor", offset=0.0, smooth=False, N=33, d=17)),
    (play.quant_error, dict(granularity="per_block", block=7, offset=5.0, smooth=True, N=50)),
    (play.memory, dict(N=257, d=33, H=3)),
    (play.occupancy, dict(block_q=16, block_kv=128, d=128, threads=256)),
    (play.kv_cache, dict(tokens=1, layers=1, kv_heads=1, d=64, group=64)),
]


@pytest.fixture(autouse=True)
def agg(monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setattr(play.plt, "show", lambda *a, **k: play.plt.close("all"))


@pytest.mark.parametrize("view,kw", VIEWS, ids=lambda x: getattr(x, "__name__", ""))
def test_every_view_draws_and_prints(view, kw, capsys):
    view(**kw)
    assert capsys.readouterr().out.strip()


def test_quant_error_shows_what_smoothing_buys(capsys):
    play.quant_error(granularity="per_tensor", offset=8.0, smooth=False)
    rough = float(capsys.readouterr().out.split("1 - cos = ")[1].rstrip(")\n"))
    play.quant_error(granularity="per_tensor", offset=8.0, smooth=True)
    smooth = float(capsys.readouterr().out.split("1 - cos = ")[1].rstrip(")\n"))
    assert smooth < rough


def test_explore_draws_once_when_static_and_gives_sliders_otherwise(monkeypatch):
    calls = []

    def view(n=3):
        calls.append(n)
    monkeypatch.setenv("FA_LAB_STATIC", "1")
    play.explore(view, n=(1, 9))
    assert calls == [3]
    seen = {}
    fake = types.SimpleNamespace(interact=lambda fn, **c: seen.update(fn=fn, controls=c))
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    monkeypatch.delenv("FA_LAB_STATIC")
    play.explore(view, n=(1, 9))
    assert seen == {"fn": view, "controls": {"n": (1, 9)}} and calls == [3]
    with pytest.raises(TypeError, match="'m'"):
        play.explore(view, m=(1, 2))
