"""The report entry point: runs notebooks, writes HTML and an index, reports failures."""

import html
import json
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
    assert index.count("<small>ok</small>") == 1 and index.count("<small>broken</small>") == 1


def test_a_stale_status_file_is_not_read_as_this_runs(tmp_path):
    import os

    path = tmp_path / "x_status.json"
    path.write_text('{"verdicts": [{"status": "met"}]}')
    os.utime(path, (1e9, 1e9))  # written long ago
    assert report._read_status(path, newer_than=2e9) is None
    assert report._read_status(path)["verdicts"]


# ---------------------------------------------------------------- the syllabus

def test_every_lesson_has_a_syllabus_entry_in_course_order():
    from fa_lab.tools import syllabus

    order = [name for name, _ in report.NOTEBOOKS]
    assert [lesson.name for lesson in syllabus.LESSONS] == order
    for lesson in syllabus.LESSONS:
        assert lesson.aim and lesson.paths and set(lesson.paths) <= set(syllabus.PATHS)
        for need in lesson.needs:  # what to read first comes first
            assert order.index(need) < order.index(lesson.name), (lesson.name, need)
        assert (report.REPO / "notebooks" / f"{lesson.name}.ipynb").exists()
    assert syllabus.path_lessons("core")[0] == "00_tour"
    with pytest.raises(ValueError, match="path"):
        syllabus.path_lessons("fast")


def test_titles_reading_time_and_neighbours(tmp_path):
    from fa_lab.tools import syllabus

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 07 · The backward pass\n\n" + "word " * 354),
                nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("y = 2")]
    nbformat.write(nb, tmp_path / "07_x.ipynb")
    assert syllabus.title(tmp_path / "07_x.ipynb") == "The backward pass"
    assert syllabus.reading_minutes(tmp_path / "07_x.ipynb") == 3  # 360 words (the heading's 6 too): 2.0 + 2 x 0.5
    assert syllabus.neighbours("b", ["a", "b", "c"]) == ("a", "c")
    assert syllabus.neighbours("a", ["a", "b"]) == (None, "b")
    assert syllabus.neighbours("z", ["a"]) == (None, None)


def test_pages_link_their_neighbours_and_the_index_keeps_run_times_per_mode(lessons, tmp_path,
                                                                           monkeypatch):
    out, res = tmp_path / "reports", tmp_path / "res"
    _notebook(lessons / "third.ipynb", "print('three')")
    report.run(out=out, notebooks=["ok", "third"], params={"quick": True}, results_dir=res,
               nb_dir=lessons, show_progress=False)
    page = (out / "ok.html").read_text()
    assert page.count('class="fa-lab-nav"') == 2  # above and below the lesson
    assert 'href="third.html"' in page and 'href="index.html"' in page
    third = (out / "third.html").read_text()
    assert 'href="ok.html"' in third and "→" not in third.split("fa-lab-nav")[1]  # last: no next
    index = (out / "index.html").read_text()
    assert "quick: " in index and "full: not run yet" in index
    assert "Two paths through the course" in index and "reading" in index
    monkeypatch.delenv("FA_LAB_QUICK", raising=False)  # else the lessons' override says quick
    report.run(out=out, notebooks=["third"], params={"quick": False}, results_dir=res,
               nb_dir=lessons, show_progress=False)
    rows = {r["name"]: r for r in json.loads((out / report.RESULTS_JSON).read_text())}
    assert set(rows["third"]["times"]) == {"quick", "full"}  # both modes, each measured here
    assert set(rows["ok"]["times"]) == {"quick"}


def test_the_real_index_reads_as_a_syllabus(tmp_path):
    """The index of the real lessons (rendered from a fake run, nothing executed): every
    lesson's aim and reading time, both paths, links to what to read first."""
    from fa_lab.tools import syllabus

    nb_dir = report.REPO / "notebooks"
    results = [report.Result(n, "ok", 1.0, times={"full": 12.0}) for n, _ in report.NOTEBOOKS]
    course = {n: {"title": syllabus.title(nb_dir / f"{n}.ipynb"), "aim": syllabus.describe(n).aim,
                  "needs": syllabus.describe(n).needs,
                  "read_min": syllabus.reading_minutes(nb_dir / f"{n}.ipynb")}
              for n, _ in report.NOTEBOOKS}
    index = report.index_html(results, {"cpu": "x"}, {"quick": False}, {}, course)
    for lesson in syllabus.LESSONS:
        assert html.escape(lesson.aim) in index
    assert index.count("<ol>") == len(syllabus.PATHS)
    assert 'href="01_online_softmax.html">01 · Online softmax' in index
    assert "full: 12 s" in index and "quick: not run yet" in index


def test_the_readme_states_the_syllabus():
    """README's lesson table and paths are the syllabus's (one source, checked here)."""
    import re

    from fa_lab.tools import syllabus

    readme = (report.REPO / "README.md").read_text()
    for path in syllabus.PATHS:
        assert " → ".join(syllabus.number(n) for n in syllabus.path_lessons(path)) in readme, path
    rows = dict(re.findall(r"^\| `(\d\d[a-z]?_\w+)` \| ([^|]+) \|", readme, re.M))
    assert set(rows) == set(syllabus.BY_NAME)
    for lesson in syllabus.LESSONS:
        assert rows[lesson.name].strip() == (", ".join(syllabus.number(n) for n in lesson.needs) or "-")
