"""Notebooks are committed clean, parametrizable, and all part of the report.

What git holds is checked (the index, else HEAD), not the working files: a learner who
runs a lesson in JupyterLab has outputs in the browser, and ``make lab`` strips them on
save anyway (``jupyter_server_config.py``), but neither may fail the tests."""

import ast
import json
import subprocess
from pathlib import Path

import pytest

from fa_lab.tools import report

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))


def _load(path):
    """The notebook as git holds it (staged, else committed); the file outside git."""
    rel = path.relative_to(NB_DIR.parent).as_posix()
    for ref in (f":{rel}", f"HEAD:{rel}"):
        done = subprocess.run(["git", "show", ref], cwd=NB_DIR.parent, capture_output=True)
        if done.returncode == 0:
            return json.loads(done.stdout.decode("utf-8"))
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_notebooks_and_each_is_in_the_report():
    assert NOTEBOOKS, "no notebooks found"
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(name for name, _ in report.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _load(path)
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_of_plain_literals_and_standard_kernel(path):
    nb = _load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(params[0]["source"]))
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell holds only assignments"
        ast.literal_eval(node.value)  # raises if not a plain literal
        names.update(t.id for t in node.targets)
    assert {"quick", "results_dir"} <= names


def _attention_mod(node) -> bool:
    """A ``score_mod``/``mask_mod`` (FlexAttention's parameters, lesson 15): the
    subject the lesson teaches, written where the learner reads it, not library code."""
    if not isinstance(node, ast.FunctionDef):
        return False
    names = tuple(a.arg for a in node.args.args)
    return names in (("score", "b", "h", "q_idx", "kv_idx"), ("b", "h", "q_idx", "kv_idx"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_from_fa_lab_and_defines_no_library_code(path):
    nb = _load(path)
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert f'setup("{path.stem}"' in code, "each lesson calls fa_lab.lessons.notebook.setup with its name"
    tree = ast.parse(code)
    defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and not _attention_mod(n)]
    assert not defs, f"{path.name} defines {defs}: library code belongs in fa_lab"
    assert "http://" not in code and "https://" not in code, "notebooks need no network"


def test_only_score_and_mask_functions_are_allowed_in_a_lesson():
    tree = ast.parse("def causal(b, h, q_idx, kv_idx):\n    return q_idx >= kv_idx\n"
                     "def helper(x):\n    return x\n")
    kept = [n.name for n in tree.body if not _attention_mod(n)]
    assert kept == ["helper"]
