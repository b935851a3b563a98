"""The command line turns bad options into argparse usage errors (exit code 2) before
any work starts."""

import pytest

from fa_lab.tools import bench, memory, report, tune
from fa_lab.__main__ import main


@pytest.fixture
def no_work(monkeypatch):
    """Any benchmark, sweep, tuning or report run fails the test: errors must come first."""
    def refuse(*a, **k):
        raise AssertionError("work started before the options were checked")

    for mod, names in ((bench, ["run", "sweep_blocks", "thread_scaling", "decode_splits",
                                "breakdown", "matmul_peak", "check_speed_claims"]),
                       (memory, ["sweep"]), (tune, ["autotune"]), (report, ["main", "run"])):
        for n in names:
            monkeypatch.setattr(mod, n, refuse)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err
    return err


@pytest.mark.parametrize("argv, match", [
    (["bench", "--sweep", "blocks", "--blocks", "128"], "--blocks: must look like BQxBK"),
    (["bench", "--sweep", "blocks", "--blocks", "0x64"], "--blocks: must be a positive int"),
    (["bench", "--N", "-5"], "--N: must be a positive int, got '-5'"),
    (["bench", "--N", "0"], "--N: must be a positive int"),
    (["bench", "--d", "2.5"], "--d: must be a positive int"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--baseline", "bogus"], "--baseline must be one of the contenders"),
    (["bench", "--kernels", "nope"], "--kernels: unknown kernel 'nope'"),
    (["bench", "--causal", "sideways"], "--causal must be"),
    (["bench", "--H", "8", "--H-kv", "3"], "multiple of --H-kv"),
    (["bench", "--sweep", "threads", "--threads", "999"], "--threads: at most"),
    (["tune", "--kernel", "naive"], "--kernel must be a tiled kernel"),
    (["tune", "--regimes", "huge"], "--regimes: unknown regime"),
    (["memory", "--N", "-1"], "--N: must be a positive int"),
    (["memory", "--kernels", "bogus"], "unknown kernel"),
    (["report", "-p", "=3"], "NAME=VALUE"),
    (["report", "-p", "N"], "NAME=VALUE"),
    (["report", "-p", "1x=3"], "NAME=VALUE"),
    (["report", "-p", "class=3"], "NAME=VALUE"),
    (["report", "--only", "99_nothing"], "--only: unknown notebook"),
])
def test_bad_options_are_usage_errors(argv, match, capsys, no_work):
    assert match in _usage_error(argv, capsys)


@pytest.mark.parametrize("cmd, opt", [("bench", "--csv"), ("bench", "--png"),
                                      ("memory", "--csv"), ("tune", "--csv")])
def test_output_path_under_a_file_fails_before_work(tmp_path, capsys, no_work, cmd, opt):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _usage_error([cmd, opt, str(blocker / "out.csv")], capsys)
    assert "is a file, not a folder" in err
    err = _usage_error([cmd, opt, str(tmp_path)], capsys)  # a folder is not a file path
    assert "folder" in err


def test_report_out_must_be_a_folder(tmp_path, capsys, no_work):
    f = tmp_path / "f"
    f.write_text("x")
    assert "must be a folder" in _usage_error(["report", "--out", str(f)], capsys)
    assert "is a file" in _usage_error(["report", "--results-dir", str(f / "sub")], capsys)


def test_good_options_reach_the_work(tmp_path, monkeypatch):
    seen = {}

    def fake_sweep(kernel, case, bq, bk, **kw):
        seen.update(kernel=kernel, bq=bq, bk=bk, N=case.Nq)
        import pandas as pd

        return pd.DataFrame([{"block_q": 1}])

    monkeypatch.setattr(bench, "sweep_blocks", fake_sweep)
    out = tmp_path / "new" / "dir" / "x.csv"
    assert main(["bench", "--sweep", "blocks", "--N", "64", "--blocks", "16x32", "32x32",
                 "--csv", str(out)]) == 0
    assert seen == {"kernel": "flash", "bq": [16, 32], "bk": [32], "N": 64}
    assert out.exists()


def test_warmup_reports_every_step():
    from fa_lab.tools.warmup import warmup

    seen = []
    line = warmup(progress=lambda i, n, label, s: seen.append((i, n, label, s)))
    n = seen[0][1]
    assert [i for i, *_ in seen] == list(range(1, n + 1)) and n >= 5
    assert all(a[3] <= b[3] for a, b in zip(seen, seen[1:]))  # elapsed time grows
    assert "kernels ready" in line
