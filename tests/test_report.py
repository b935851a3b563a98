"""The report entry point: runs notebooks, writes HTML and an index, reports failures."""

import re

import nbformat
import pytest

from fa_lab.tools import report
from fa_lab.__main__ import main


EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import\s+url\(\s*["']?(?:https?:)?//|url\(\s*["']?https?://""", re.I)


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell("quick = False\nresults_dir = '..'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


@pytest.fixture
def lessons(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    _notebook(nb_dir / "ok.ipynb", "import fa_lab\nassert quick is True\nprint('fine')")
    _notebook(nb_dir / "broken.ipynb", "x = 1", "raise RuntimeError('deliberate failure')")
    return nb_dir


def test_report_writes_pages_and_names_the_failing_cell(lessons, tmp_path):
    out = tmp_path / "reports"
    results = report.run(out=out, notebooks=["ok", "broken"], params={"quick": True},
                         results_dir=tmp_path / "res", nb_dir=lessons, show_progress=False)
    status = {r.name: r for r in results}
    assert status["ok"].status == "ok"
    assert status["broken"].status == "failed" and status["broken"].cell == 2
    assert "deliberate failure" in status["broken"].error
    for name in ("ok", "broken"):  # both rendered, the failed one with its traceback
        assert (out / f"{name}.ipynb").exists() and (out / f"{name}.html").exists()
    index = (out / "index.html").read_text()
    assert "broken" in index and "cell 2" in index and "deliberate failure" in index
    for page in (index, (out / "ok.html").read_text()):  # renders offline: nothing to fetch
        assert not EXTERNAL.findall(page), EXTERNAL.findall(page)[:3]
    assert not list(out.glob(".*tmp*")), "temporary files must be moved into place"


def test_rerun_is_idempotent_and_keeps_good_pages(lessons, tmp_path):
    out = tmp_path / "reports"
    for _ in range(2):
        report.run(out=out, notebooks=["ok"], results_dir=tmp_path / "res", nb_dir=lessons,
                   show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "ok.html", "ok.ipynb",
                                                     report.RESULTS_JSON]


def test_cli_exit_code_is_nonzero_when_a_notebook_fails(lessons, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REPO", tmp_path)  # notebooks/ under tmp_path
    rc = main(["report", "--quick", "--out", str(tmp_path / "r"), "--only", "ok", "broken",
               "--results-dir", str(tmp_path / "res")])
    assert rc == 1
    assert main(["report", "--out", str(tmp_path / "r2"), "--only", "ok",
                 "--results-dir", str(tmp_path / "res"), "-p", "quick=True"]) == 0


def test_unknown_notebook_and_bad_param():
    with pytest.raises(FileNotFoundError, match="nope"):
        report.run(notebooks=["nope"], show_progress=False)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        report.parse_params(["quick"])
    assert report.parse_params(["quick=True", "N=2048", "label=abc"]) == {
        "quick": True, "N": 2048, "label": "abc"}


def test_a_lesson_missing_its_optional_packages_is_skipped_not_failed(lessons, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setitem(report.REQUIRES, "ok", ("no_such_package_here",))
    results = report.run(out=tmp_path / "r", notebooks=["ok"], results_dir=tmp_path / "res",
                         nb_dir=lessons, show_progress=False)
    assert results[0].status == "skipped" and "no_such_package_here" in results[0].error
    assert not (tmp_path / "r" / "ok.ipynb").exists()  # nothing ran
    assert "skipped" in (tmp_path / "r" / "index.html").read_text()
    assert report.missing_requirements("00_tour") == []


def test_an_interrupted_lesson_keeps_its_previous_results_and_leaves_no_temp_file(
        lessons, tmp_path, monkeypatch):
    import papermill

    out, res = tmp_path / "reports", tmp_path / "res"
    report.run(out=out, notebooks=["ok"], results_dir=res, nb_dir=lessons, show_progress=False)
    status = res / "data" / "ok_status.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text('{"verdicts": []}')  # what the lesson wrote last time
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(path, tmp, **kw):  # Ctrl-C while the kernel writes its notebook
        with open(tmp, "w") as f:
            f.write("{half a notebook")
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.run(out=out, notebooks=["ok"], results_dir=res, nb_dir=lessons,
                   show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert status.read_text() == '{"verdicts": []}'
    assert not list(out.glob(".*")) and not list(res.rglob(".*tmp*"))


def test_only_updates_the_index_instead_of_replacing_it(lessons, tmp_path):
    out, res = tmp_path / "reports", tmp_path / "res"
    quick = {"quick": True}
    report.run(out=out, notebooks=["ok", "broken"], params=quick, results_dir=res,
               nb_dir=lessons, show_progress=False)
    report.run(out=out, notebooks=["ok"], params=quick, results_dir=res, nb_dir=lessons,
               show_progress=False)
    index = (out / "index.html").read_text()
    assert "deliberate failure" in index  # the lesson not re-run keeps its row
    assert index.count("<tr><td>ok</td>") == 1 and index.count("<tr><td>broken</td>") == 1


def test_a_stale_status_file_is_not_read_as_this_runs(tmp_path):
    import os

    path = tmp_path / "x_status.json"
    path.write_text('{"verdicts": [{"status": "met"}]}')
    os.utime(path, (1e9, 1e9))  # written long ago
    assert report._read_status(path, newer_than=2e9) is None
    assert report._read_status(path)["verdicts"]
