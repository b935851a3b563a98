"""Root pytest configuration: notebooks collected by nbval run in quick mode.

nbval cannot pass papermill parameters, so the lessons read two environment
overrides (see :mod:`fa_lab.notebook`). The kernels nbval starts inherit them.
Figures and tables of the quick runs go to a temporary folder, never over the
curated files in ``figures/`` and ``data/``; autotuner choices to a temporary file.
"""

import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("FA_LAB_QUICK", "1")
    os.environ.setdefault("FA_LAB_RESULTS_DIR", tempfile.mkdtemp(prefix="fa_lab_nbval_"))
    # The autotuner's choices go to a throwaway file: tests never read or change the
    # user's ~/.cache/fa_lab/tuned.json (which would change what kernel="auto" runs).
    os.environ["FA_LAB_TUNE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="fa_lab_tune_"),
                                                  "tuned.json")
