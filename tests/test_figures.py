"""Lessons show their figures: image outputs in the executed notebook and <img> in its
HTML page, not only PNG files on disk (a backend chosen at import once hid them all)."""

import json

import nbformat
import pytest

from fa_lab.tools import report

LESSONS = ["00_tour", "03_causal_masking"]


def _draws(source: str) -> bool:
    return "save_fig(" in source


@pytest.mark.slow
def test_every_drawing_cell_shows_its_figure_inline(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # as in JupyterLab and `make report`
    out = tmp_path / "reports"
    results = report.run(out=out, notebooks=LESSONS, params={"quick": True},
                         results_dir=tmp_path / "results", show_progress=False)
    assert [r.status for r in results] == ["ok"] * len(LESSONS), [r.error for r in results]
    for name in LESSONS:
        nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
        drawing = [c for c in nb.cells if c.cell_type == "code" and _draws(c.source)]
        assert drawing, f"{name}: no cell draws a figure"
        for cell in drawing:
            images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            assert images, f"{name}: a cell that saves a figure shows none:\n{cell.source[:200]}"
        page = (out / f"{name}.html").read_text()
        assert page.count("<img") >= len(drawing), f"{name}.html shows fewer images than cells draw"
        status = json.loads((tmp_path / "results" / "data" / f"{name}_status.json").read_text())
        assert status["verdicts"], f"{name}: its budget has no computed verdict"
        assert all(v["status"] in {"met", "not met", "inconclusive", "agrees", "suspicious"}
                   for v in status["verdicts"])  # budgets, and consistency checks
