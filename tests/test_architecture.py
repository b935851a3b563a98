"""The layering of docs/ARCHITECTURE.md, read from the code's own imports.

Each fa_lab module belongs to one layer; a module imports only from its own layer or
below, the import graph has no cycle, no fa_lab module is imported inside a function
(except the documented exceptions), and no module is over 450 lines. A new module must
be given a layer here: the test fails until it is.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fa_lab"
MAX_LINES = 450

#: Layer of every module, bottom (0) to top (7); a package's modules share its layer
#: unless listed themselves.
LAYERS = {
    # 0: settings and the machine
    "fa_lab.config": 0, "fa_lab._blas": 0, "fa_lab.machine": 0, "fa_lab.cpu_features": 0,
    # 1: reference, testing, numerics helpers, the tuning file's reader
    "fa_lab.reference": 1, "fa_lab.testing": 1, "fa_lab.verdict": 1, "fa_lab.dropout": 1,
    "fa_lab.quant": 1, "fa_lab.tiling": 1, "fa_lab.softmax": 1, "fa_lab.simd": 1,
    "fa_lab.checks": 1, "fa_lab.tuning_file": 1, "fa_lab.scoremod": 1,
    # 2: kernels (never the registry)
    "fa_lab.kernels": 2,
    # 3: the registry
    "fa_lab.registry": 3,
    # 4: the API
    "fa_lab.api": 4,
    # 5: features
    "fa_lab.backward": 5, "fa_lab.int8": 5, "fa_lab.decoding": 5, "fa_lab.retrieval": 5,
    "fa_lab.memory": 5, "fa_lab.minilm": 5, "fa_lab.traffic": 5, "fa_lab.puzzles": 5,
    "fa_lab.integrations": 5, "fa_lab.integrations.torch": 5,
    "fa_lab.integrations.transformers": 5, "fa_lab.varlen": 5, "fa_lab.kvcache": 5,
    # 6: tools (benchmarks, autotuner, studies, figures, report)
    "fa_lab.bench": 6, "fa_lab.tune": 6, "fa_lab.presets": 6, "fa_lab.viz": 6,
    "fa_lab.notebook": 6, "fa_lab.report": 6, "fa_lab.hierarchy": 6, "fa_lab.int8_study": 6,
    "fa_lab.gpu": 6, "fa_lab.integrations.realmodel": 6,
    # 7: the CLI and the package's facade (fa_lab/__init__.py)
    "fa_lab.__main__": 7, "fa_lab": 7,
}

#: Function-local fa_lab imports allowed, with the reason (docs/ARCHITECTURE.md).
LOCAL_IMPORT_EXCEPTIONS = {
    # importing the kernel imports numba.cuda (the optional `gpu` extra), which fixes
    # whether numba's CUDA simulator is on: it must wait until the kernel is asked for
    ("fa_lab.registry", "fa_lab.kernels.cuda_fa2"),
    ("fa_lab.gpu", "fa_lab.kernels.cuda_fa2"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "__pycache__" not in p.parts}


def layer_of(name: str) -> int:
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(name)
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def imports(name: str, path: Path, known) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every fa_lab import of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports inside a top-level `try:`/`if` still run at import
        if isinstance(n, (ast.Try, ast.If)):
            top |= {id(m) for m in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "fa_lab" and t != name and t in known:
                found.append((t, node.lineno, id(node) in top))
    return found


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer():
    missing = []
    for name in modules():
        try:
            layer_of(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"give these modules a layer in LAYERS (and ARCHITECTURE.md): {missing}"


def test_no_module_imports_a_layer_above_it():
    bad = [f"{name} (layer {layer_of(name)}) imports {t} (layer {layer_of(t)}), line {line}"
           for name, edges in GRAPH.items() for t, line, _ in edges
           if layer_of(t) > layer_of(name)]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_facade():
    bad = [f"{name} line {line}" for name, edges in GRAPH.items() for t, line, _ in edges
           if t == "fa_lab" and name != "fa_lab.__main__"]
    assert not bad, f"import from the defining module, not from fa_lab: {bad}"


def test_no_import_cycles():
    graph = {n: {t for t, _, _ in e} for n, e in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in graph[n]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_function_local_fa_lab_imports():
    bad = [f"{name} imports {t} inside a function (line {line})"
           for name, edges in GRAPH.items() for t, line, at_top in edges
           if not at_top and (name, t) not in LOCAL_IMPORT_EXCEPTIONS]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_450_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it by concern"


def test_the_checker_sees_a_violation(tmp_path):
    """The import reader itself: a kernel importing the registry, and a local import."""
    src = "from fa_lab import registry\n\ndef f():\n    from fa_lab.api import attention\n"
    path = tmp_path / "probe.py"
    path.write_text(src)
    edges = imports("fa_lab.kernels._probe_not_a_module", path, set(modules()))
    assert ("fa_lab.registry", 1, True) in edges and ("fa_lab.api", 4, False) in edges
    assert layer_of("fa_lab.kernels._probe_not_a_module") < layer_of("fa_lab.registry")


SIDE_EFFECTS = r"""
import json, scipy.linalg.cython_blas
from threadpoolctl import threadpool_info
def threads():
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")
before = threads()
import numpy as np
import fa_lab
from fa_lab.kernels import flash
after_import = threads()
limited_at_import = list(flash.BLAS_LIMITED)
q = np.ones((1, 1, 4, 8), np.float32)
fa_lab.attention(q, q, q, kernel="flash")
print(json.dumps({"before": before, "after_import": after_import,
                  "limited_at_import": limited_at_import, "limited": flash.BLAS_LIMITED,
                  "after_call": threads()}))
"""


def test_importing_changes_no_blas_setting_the_first_flash_call_does():
    done = subprocess.run([sys.executable, "-c", SIDE_EFFECTS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["after_import"] == r["before"] and r["limited_at_import"] == []
    assert r["limited"], "the first flash call must record which BLAS it limited"
    changed = {path for path, n in r["after_call"] if n == 1} - {p for p, n in r["before"]
                                                                  if n == 1}
    if r["limited"] != ["(no separate SciPy BLAS found)"]:
        assert changed or all(n == 1 for _, n in r["before"])


def test_settings_are_read_from_config_at_call_time(monkeypatch):
    from fa_lab import config
    from fa_lab.kernels.flash import plan_splits

    assert plan_splits(1, 1, 1, 8192, 1, 256, threads=2) > 1
    monkeypatch.setattr(config, "SPLIT_MIN_KEYS", 8192)
    assert plan_splits(1, 1, 1, 8192, 1, 256, threads=2) == 1
