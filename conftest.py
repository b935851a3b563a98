"""Root pytest configuration: notebooks collected by nbval run in quick mode.

nbval cannot pass papermill parameters, so the lessons read two environment
overrides (see :mod:`fa_lab.lessons.notebook`). The kernels nbval starts inherit them.
Figures and tables of the quick runs go to a temporary folder, never over the
curated files in ``figures/`` and ``data/``; autotuner choices to a temporary file.
"""

import os
import tempfile

# The GPU kernel runs in numba's CUDA simulator unless told otherwise (set
# NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU to test on the device). numba reads it
# when it is imported: that happens while pytest loads tests/conftest.py, before any
# pytest_configure hook, so it is set here, when this root conftest is loaded (first).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def pytest_configure(config):
    os.environ.setdefault("FA_LAB_QUICK", "1")
    os.environ.setdefault("FA_LAB_RESULTS_DIR", tempfile.mkdtemp(prefix="fa_lab_nbval_"))
    os.environ.setdefault("FA_LAB_STATIC", "1")  # lessons' sliders draw once (no frontend)
    # The autotuner's choices go to a throwaway file: tests never read or change the
    # user's ~/.cache/fa_lab/tuned.json (which would change what kernel="auto" runs).
    os.environ["FA_LAB_TUNE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="fa_lab_tune_"),
                                                  "tuned.json")


def pytest_collection_modifyitems(config, items):
    """A lesson whose optional packages are missing (TORCH=0, MODELS=0) is skipped, with
    the reason, instead of failing under nbval."""
    import pytest

    from fa_lab.tools.report import missing_requirements

    for item in items:
        path = getattr(item, "path", None)
        if path is None or path.suffix != ".ipynb":
            continue
        missing = missing_requirements(path.stem)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (not installed)"))
