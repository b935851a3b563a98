"""Helpers for the lessons: quick mode, where results go, saving, showing source.

The notebooks' papermill ``parameters`` cells hold plain literals (``quick``,
``results_dir``, sizes); :func:`setup` then applies two environment overrides so
nbval (which cannot pass parameters) runs them in quick mode into a temporary folder:

* ``FA_LAB_QUICK=1`` -- small sizes (what CI runs)
* ``FA_LAB_RESULTS_DIR=path`` -- write ``figures/`` and ``data/`` there instead
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

from fa_lab.bench import describe_machine


@dataclass
class Lesson:
    name: str
    quick: bool
    figures: Path
    data: Path
    machine: str

    def save_fig(self, fig, stem: str) -> Path:
        """Save ``fig`` as ``figures/<lesson>_<stem>.png`` with the machine as a footer."""
        from fa_lab.viz import footer

        footer(fig, self.machine)
        path = self.figures / f"{self.name}_{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return path

    def save_table(self, df, stem: str) -> Path:
        """Save a DataFrame as ``data/<lesson>_<stem>.csv``."""
        path = self.data / f"{self.name}_{stem}.csv"
        df.to_csv(path, index=False)
        return path


def setup(name: str, quick: bool = False, results_dir: str = "..") -> Lesson:
    """Apply the environment overrides, create the output folders, print the machine."""
    quick = bool(quick) or os.environ.get("FA_LAB_QUICK", "0") == "1"
    root = Path(os.environ.get("FA_LAB_RESULTS_DIR") or results_dir)
    lesson = Lesson(name, quick, root / "figures", root / "data", describe_machine())
    lesson.figures.mkdir(parents=True, exist_ok=True)
    lesson.data.mkdir(parents=True, exist_ok=True)
    print(f"lesson {name}: quick={quick}, results in {root.resolve()}")
    print(f"machine: {lesson.machine}")
    return lesson


def show_source(obj) -> None:
    """Print the source of a function (the Python behind a jitted one) or module."""
    fn = getattr(obj, "py_func", obj)
    print(inspect.getsource(fn))
