"""Helpers for the lessons: quick mode, where results go, saving, verdicts, showing source.

The notebooks' papermill ``parameters`` cells hold plain literals (``quick``,
``results_dir``, sizes); :func:`setup` then applies two environment overrides so
nbval (which cannot pass parameters) runs them in quick mode into a temporary folder:

* ``FA_LAB_QUICK=1`` -- small sizes (what CI runs)
* ``FA_LAB_RESULTS_DIR=path`` -- write ``figures/`` and ``data/`` there instead

Results go to ``../reports`` by default (ignored by git): running a lesson, in
JupyterLab or through ``make report``, never modifies tracked files. The curated
figures and tables of ``docs/RESULTS.md`` are written only by ``make curate``.

Every budget a lesson states is followed by :meth:`Lesson.check`, which prints the
verdict computed from that run (:mod:`fa_lab.numerics.verdict`) and records it, with the load of
every timing window, in ``data/<lesson>_status.json`` for the report's index.
"""

from __future__ import annotations

import html
import inspect
import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from fa_lab.settings import machine as _machine
from fa_lab.settings.machine import Load, describe_machine, load_summary
from fa_lab.numerics.verdict import Verdict, judge
from fa_lab.viz import footer


@dataclass
class Lesson:
    name: str
    quick: bool
    figures: Path
    data: Path
    machine: str
    verdicts: list = field(default_factory=list)
    tables: list = field(default_factory=list)  # stems saved by this run of the lesson
    _log_start: int = 0  # first window of machine.LOG that belongs to this lesson
    _fig_start: int = 0  # first window since the last saved figure

    def loads(self, since_figure: bool = False) -> list[Load]:
        """Load of every timing window of this lesson (or since the last saved figure)."""
        return _machine.LOG[self._fig_start if since_figure else self._log_start:]

    def save_fig(self, fig, stem: str) -> Path:
        """Save ``fig`` as ``figures/<lesson>_<stem>.png`` with the machine (and, when a
        timing behind it ran on a busy machine, the load) as a footer."""
        loads = self.loads(since_figure=True)
        text = f"measured on: {self.machine}"
        if loads and Load.merge(loads).busy:
            text = f"{load_summary(loads)} | {text}"
        footer(fig, text)
        path = self.figures / f"{self.name}_{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        self._fig_start = len(_machine.LOG)
        self._write_status()
        return path

    def save_table(self, df, stem: str) -> Path:
        """Save a DataFrame as ``data/<lesson>_<stem>.csv``."""
        path = self.data / f"{self.name}_{stem}.csv"
        df.to_csv(path, index=False)
        if stem not in self.tables:  # saved in this run (Lesson.from_run reads only those)
            self.tables.append(stem)
            self._write_status()
        return path

    def from_run(self, lesson: str, stem: str, **config):
        """The table ``stem`` that ``lesson`` saved earlier in this report run (same
        mode; a table left by an earlier run is never read), if every row has ``config``
        (column == value; for a list, the column's values are exactly its items): one
        measurement per fact,
        read instead of timed again. None otherwise, and always outside a report (a
        lesson run alone in JupyterLab measures everything itself)."""
        run = os.environ.get("FA_LAB_RUN")
        table = self.data / f"{lesson}_{stem}.csv"
        try:
            status = json.loads((self.data / f"{lesson}_status.json").read_text())
        except (OSError, ValueError):
            return None
        if not run or status.get("run") != run or status.get("quick") != self.quick or (
                stem not in status.get("tables", ())) or not table.exists():
            return None
        import pandas as pd

        df = pd.read_csv(table)
        if df.empty or any(k not in df or not (
                set(df[k]) == set(v) if isinstance(v, (list, tuple, set)) else (df[k] == v).all())
                for k, v in config.items()):
            return None
        print(f"Read from lesson {lesson} ('{stem}'), measured earlier in this run with the "
              f"same {', '.join(f'{k}={v}' for k, v in config.items())}: one measurement per fact.")
        return df

    def check(self, verdict: Verdict) -> Verdict:
        """Show a computed verdict under the budget it judges, and record it."""
        self.verdicts.append(verdict)
        _show_verdict(verdict)
        self._write_status()
        return verdict

    def verdict(self, what: str, value: float, need, **kw) -> Verdict:
        """:func:`fa_lab.numerics.verdict.judge` and :meth:`check` in one call."""
        return self.check(judge(what, value, need, **kw))

    def _write_status(self) -> None:
        loads = self.loads()
        merged = Load.merge(loads)
        status = {"lesson": self.name, "quick": self.quick, "run": os.environ.get("FA_LAB_RUN"),
                  "tables": self.tables,
                  "verdicts": [v.row() for v in self.verdicts],
                  "windows": len(loads), "busy_windows": sum(x.busy for x in loads),
                  "max_others_pct": 100 * merged.others if merged.known else None,
                  "max_steal_pct": 100 * merged.steal if merged.known else None,
                  "load": load_summary(loads) if loads else "no timing"}
        tmp = self.data / f".{self.name}_status.json.tmp"
        tmp.write_text(json.dumps(status, indent=1))
        tmp.replace(self.data / f"{self.name}_status.json")


_COLORS = {"met": "#1a7f37", "consistent": "#1a7f37", "not met": "#c62828",
           "overstated here": "#c62828", "understated": "#8a6d00", "inconclusive": "#8a6d00",
           "suspicious": "#b35c00", "agrees": "#1a7f37"}


def _show_verdict(v: Verdict) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        color = _COLORS.get(v.status, "#333")
        display(HTML(f'<p style="margin:.3em 0"><b style="color:{color}">verdict: '
                     f'{html.escape(v.status)}</b> &mdash; {html.escape(v.what)}: '
                     f'{html.escape(v.text)}</p>'))
    else:
        print(textwrap.fill(f"verdict: {v}", 100))


def setup(name: str, quick: bool = False, results_dir: str = "../reports") -> Lesson:
    """Apply the environment overrides, create the output folders, print the machine."""
    quick = bool(quick) or os.environ.get("FA_LAB_QUICK", "0") == "1"
    root = Path(os.environ.get("FA_LAB_RESULTS_DIR") or results_dir)
    lesson = Lesson(name, quick, root / "figures", root / "data", describe_machine())
    lesson.figures.mkdir(parents=True, exist_ok=True)
    lesson.data.mkdir(parents=True, exist_ok=True)
    lesson._log_start = lesson._fig_start = len(_machine.LOG)
    lesson._write_status()
    _whole_tables()
    print(f"lesson {name}: quick={quick}, results in {root.resolve()}")
    print(f"machine: {lesson.machine}")
    return lesson


def _whole_tables() -> None:
    """Tables are shown whole: no column or cell text cut off by pandas' display limits,
    and every row up to 500 (a lesson's tables are smaller; a cut note or a hidden column
    misleads)."""
    try:
        import pandas as pd
    except ImportError:  # the lab extra is not installed: no tables to show
        return
    for option, value in (("display.max_columns", None), ("display.max_colwidth", None),
                          ("display.max_rows", 500), ("display.min_rows", 500),
                          ("display.width", 200)):
        pd.set_option(option, value)


def show_source(obj) -> None:
    """Print the source of a function (the Python behind a jitted one) or module."""
    fn = getattr(obj, "py_func", obj)
    print(inspect.getsource(fn))


def show_side_by_side(left, right, titles=("", "")) -> None:
    """Two functions' sources in two columns (HTML in Jupyter, one after the other in a
    terminal), to read a GPU kernel beside its CPU counterpart."""
    sources = [inspect.getsource(getattr(obj, "py_func", obj)) for obj in (left, right)]
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        for title, src in zip(titles, sources):
            print(f"--- {title}\n{src}")
        return
    cols = "".join(f'<td style="vertical-align:top;text-align:left"><b>{html.escape(t)}</b>'
                   f'<pre style="font-size:10px">{html.escape(src)}</pre></td>'
                   for t, src in zip(titles, sources))
    display(HTML(f"<table><tr>{cols}</tr></table>"))
