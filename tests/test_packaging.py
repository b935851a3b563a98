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
