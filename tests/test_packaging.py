"""Packaging: one version, a license file and an SPDX expression, the typing marker."""

import importlib.metadata
import tomllib
from pathlib import Path

import fa_lab

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_once():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in meta and "version" in meta["dynamic"]
    assert importlib.metadata.version("fa_lab") == fa_lab.__version__


def test_license_and_typing_marker():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "fa_lab" / "py.typed").exists()
    assert (ROOT / "CHANGELOG.md").exists()


LAB = {"pandas", "matplotlib", "memray", "papermill", "jupyterlab", "ipykernel", "nbconvert",
       "nbformat", "notebook", "tqdm", "psutil"}


def test_the_core_install_is_lean():
    import re

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=;!~ ]", d, maxsplit=1)[0].lower() for d in meta["dependencies"]}
    assert core == {"numpy", "numba", "scipy", "threadpoolctl", "tbb"}, core
    lab = {re.split(r"[<>=;!~ ]", d, maxsplit=1)[0].lower()
           for d in meta["optional-dependencies"]["lab"]}
    assert not core & LAB and {"jupyterlab", "papermill", "pandas", "matplotlib"} <= lab
    tbb = next(d for d in meta["dependencies"] if d.startswith("tbb"))
    assert "platform_machine" in tbb  # no wheel off x86-64: a marker, not a failed install


ELSEWHERE = r"""
import json, platform, sys
sys.modules["resource"] = None        # as on Windows
platform.machine = lambda: "arm64"    # as on Apple silicon: no TBB wheel for it
import numpy as np
import fa_lab
from fa_lab.settings import config, machine
q = np.ones((1, 1, 4, 8), np.float32)
out = fa_lab.attention(q, q, q)
with machine.LoadMonitor() as mon:
    pass
print(json.dumps({"tbb_wheels": config.TBB_WHEELS, "ok": bool(np.allclose(out, 1.0)),
                  "own_cpu": machine._own_cpu() >= 0}))
"""


def test_import_without_linux_only_modules():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ELSEWHERE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r == {"tbb_wheels": False, "ok": True, "own_cpu": True}
