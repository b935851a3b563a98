"""The architecture of docs/ARCHITECTURE.md, read from the code itself.

The folders are the layers (:data:`LAYERS`). Each rule is a function that returns its
violations for a given import graph or tree, so every rule is tested twice: on fa_lab
(no violation) and on a planted violation (the rule must see it).

1. a module imports only from its own layer or below;
2. the import graph has no cycle;
3. only the CLI imports the ``fa_lab`` facade;
4. no fa_lab module is imported inside a function (documented exceptions only);
5. features, integrations, tools, viz and lessons never import a kernel module (they go
   through ``fa_lab.api.prepare(...).run(...)`` and the registry); the machine probes of
   ``fa_lab.kernels.probes`` are the one door for tools that time loops;
6. no module imports a name starting with ``_`` from another module;
7. no module is over 450 lines;
8. every module sits in a layer folder and is named in docs/ARCHITECTURE.md;
9. the code speaks of itself alone: no issue numbers, performance diaries or paths
   outside the repository in code, tests, notebooks or docs;
10. ``import fa_lab`` stays light: no pandas, matplotlib, the tools or the lessons.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fa_lab"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 450

#: The layers, bottom (0) to top (8): a folder's modules share its layer.
LAYERS = {
    "fa_lab.settings": 0,
    "fa_lab.numerics": 1,
    "fa_lab.kernels": 2,
    "fa_lab.registry": 3,
    "fa_lab.api": 4,
    "fa_lab.features": 5, "fa_lab.integrations": 5, "fa_lab.distributed": 5,
    "fa_lab.tools": 6, "fa_lab.viz": 6,
    "fa_lab.lessons": 7,
    "fa_lab.__main__": 8, "fa_lab": 8,
}

#: Layers that reach kernels only through the API and the registry.
ABOVE_THE_API = ("fa_lab.features", "fa_lab.integrations", "fa_lab.distributed",
                 "fa_lab.tools", "fa_lab.viz",
                 "fa_lab.lessons", "fa_lab.__main__")
#: The one door to jitted code for tools: loops that measure the machine.
PROBES = "fa_lab.kernels.probes"

#: Function-local fa_lab imports allowed, with the reason (docs/ARCHITECTURE.md).
LOCAL_IMPORT_EXCEPTIONS = {
    # importing the kernel imports numba.cuda (the optional `gpu` extra), which fixes
    # whether numba's CUDA simulator is on: it must wait until the kernel is asked for
    ("fa_lab.registry", "fa_lab.kernels.gpu.cuda_fa2"),
}

#: Words that mark a performance diary or a pointer outside the repository.
DIARY = re.compile(r"\bissue\s*#?\d+|\.\./shared|PITFALLS\.md|the performance issue",
                   re.IGNORECASE)


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


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports(name: str, path: Path, known) -> list[tuple[str, int, bool, tuple[str, ...]]]:
    """``(module, line, at module level, names)`` for every fa_lab import of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports inside a top-level `try:`/`if` still run at import
        if isinstance(n, (ast.Try, ast.If)):
            top |= {id(m) for m in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            pairs = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            pairs = [(f"{mod}.{a.name}", ()) if f"{mod}.{a.name}" in known else (mod, (a.name,))
                     for a in node.names]
        else:
            continue
        for t, names in pairs:
            if t.split(".")[0] == "fa_lab" and t != name and t in known:
                found.append((t, node.lineno, id(node) in top, names))
    return found


def graph_of(mods: dict[str, Path]) -> dict[str, list]:
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


# -- the rules: each returns a list of violations ---------------------------------------

def upward(graph) -> list[str]:
    return [f"{n} (layer {layer_of(n)}) imports {t} (layer {layer_of(t)}), line {line}"
            for n, edges in graph.items() for t, line, _, _ in edges
            if layer_of(t) > layer_of(n)]


def facade_imports(graph) -> list[str]:
    return [f"{n} line {line}" for n, edges in graph.items() for t, line, _, _ in edges
            if t == "fa_lab" and n != "fa_lab.__main__"]


def cycles(graph) -> list[str]:
    adj = {n: {t for t, _, _, _ in e} for n, e in graph.items()}
    state, stack, found = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in adj.get(n, ()):
            if state.get(t) == 1:
                found.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in adj:
        if n not in state:
            visit(n)
    return found


def local_imports(graph) -> list[str]:
    return [f"{n} imports {t} inside a function (line {line})"
            for n, edges in graph.items() for t, line, at_top, _ in edges
            if not at_top and (n, t) not in LOCAL_IMPORT_EXCEPTIONS]


def kernel_reach(graph) -> list[str]:
    return [f"{n} imports {t} (line {line}): go through fa_lab.api.prepare(...).run(...)"
            for n, edges in graph.items() if any(within(n, p) for p in ABOVE_THE_API)
            for t, line, _, _ in edges
            if within(t, "fa_lab.kernels") and not within(t, PROBES)]


def private_names(graph) -> list[str]:
    return [f"{n} imports {name} from {t} (line {line})"
            for n, edges in graph.items() for t, line, _, names in edges
            for name in names if name.startswith("_")] + [
            f"{n} imports the private module {t} (line {line})"
            for n, edges in graph.items() for t, line, _, _ in edges
            if any(part.startswith("_") and part != "__main__" for part in t.split("."))]


def unplaced(mods) -> list[str]:
    bad = []
    for n in mods:
        try:
            layer_of(n)
        except KeyError:
            bad.append(n)
    return bad


def undocumented(mods, doc: str) -> list[str]:
    """Modules whose dotted name (without ``fa_lab.``) the architecture page never names."""
    def pattern(n):
        return "[./]".join(re.escape(p) for p in n.removeprefix("fa_lab.").split("."))
    return [n for n in mods if n != "fa_lab"
            and not re.search(rf"(?<![\w./]){pattern(n)}(?![\w])", doc)]


def diary_lines(paths) -> list[str]:
    hits = []
    for p in paths:
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if DIARY.search(line):
                hits.append(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}:{i}: "
                            f"{line.strip()[:100]}")
    return hits


GRAPH = graph_of(modules())


# -- fa_lab obeys every rule -----------------------------------------------------------

@pytest.mark.parametrize("rule", [upward, facade_imports, cycles, local_imports, kernel_reach,
                                  private_names])
def test_the_import_graph_obeys(rule):
    bad = rule(GRAPH)
    assert not bad, f"{rule.__name__}:\n" + "\n".join(bad)


def test_every_module_sits_in_a_layer_folder():
    assert not unplaced(modules())
    loose = [n for n in modules() if n.count(".") == 1 and n not in LAYERS]
    assert not loose, f"put these modules in a layer folder: {loose}"


def test_architecture_page_names_every_module():
    bad = undocumented(modules(), DOC.read_text())
    assert not bad, f"docs/ARCHITECTURE.md does not name: {bad}"


def test_architecture_page_states_the_enforced_rules():
    doc = DOC.read_text()
    for layer in ("settings", "numerics", "kernels", "registry", "api", "features",
                  "integrations", "tools", "viz", "lessons"):
        assert f"{layer}" in doc
    assert "tests/test_architecture.py" in doc
    for phrase in ("cycle", "inside a function", "kernel module", "`_`", "450 lines",
                   "import fa_lab"):
        assert phrase in doc, f"docs/ARCHITECTURE.md should state the rule on {phrase!r}"


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "fa_lab", "tests", "notebooks", "docs",
                          "README.md"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout: read the folders
        return [p for d in ("fa_lab", "tests", "notebooks", "docs") for p in (ROOT / d).rglob("*")
                if p.suffix in (".py", ".ipynb", ".md")]
    return [ROOT / f for f in out.stdout.split() if Path(f).suffix in (".py", ".ipynb", ".md")
            and f != "tests/test_architecture.py" and (ROOT / f).exists()]


def test_the_code_speaks_of_itself_alone():
    hits = diary_lines(tracked_text_files())
    assert not hits, "history goes in git, results in lessons:\n" + "\n".join(hits[:20])


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_450_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it by concern"


LIGHT = r"""
import json, sys
import fa_lab
print(json.dumps(sorted(m for m in sys.modules
                        if m.split(".")[0] in ("pandas", "matplotlib", "torch", "memray",
                                               "papermill")
                        or m.startswith(("fa_lab.tools", "fa_lab.lessons", "fa_lab.viz")))))
"""


def test_import_fa_lab_is_light():
    done = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == [], f"import fa_lab loaded {heavy}"


# -- each rule sees a planted violation ------------------------------------------------

def planted(tmp_path, files: dict[str, str]) -> dict[str, list]:
    """An import graph of fa_lab's modules plus ``files`` (module name -> source)."""
    mods = dict(modules())
    for name, src in files.items():
        path = tmp_path / (name.replace(".", "_") + ".py")
        path.write_text(src)
        mods[name] = path
    return graph_of(mods), mods


PLANTS = {
    upward: {"fa_lab.kernels.ladder.probe": "from fa_lab import registry\n"},
    facade_imports: {"fa_lab.tools.probe": "import fa_lab\n"},
    cycles: {"fa_lab.numerics.probe_a": "from fa_lab.numerics import probe_b\n",
             "fa_lab.numerics.probe_b": "from fa_lab.numerics import probe_a\n"},
    local_imports: {"fa_lab.tools.probe": "def f():\n    from fa_lab.api import attention\n"},
    kernel_reach: {"fa_lab.tools.probe": "from fa_lab.kernels.ladder import flash\n"},
    private_names: {"fa_lab.kernels.probe": "from fa_lab.kernels.common import _private\n"},
}


@pytest.mark.parametrize("rule", list(PLANTS), ids=lambda r: r.__name__)
def test_each_rule_sees_a_planted_violation(rule, tmp_path):
    graph, _ = planted(tmp_path, PLANTS[rule])
    assert rule(graph), f"{rule.__name__} missed its planted violation"
    assert not rule(GRAPH)


def test_the_probes_are_the_one_door(tmp_path):
    graph, _ = planted(tmp_path, {"fa_lab.tools.probe": "from fa_lab.kernels.probes import peaks\n"})
    assert not kernel_reach(graph)


def test_placement_and_docs_rules_see_planted_violations(tmp_path):
    assert unplaced({"fa_lab_other.probe": None}) == ["fa_lab_other.probe"]
    assert undocumented({"fa_lab.tools.not_in_the_doc": None}, DOC.read_text())
    assert not undocumented({"fa_lab.tools.bench.harness": None}, "tools/bench.harness")
    page = tmp_path / "probe.md"
    planted = "As measured in " + "issue" + " 15, see " + "../" + "shared/notes.md"  # built here:
    page.write_text(planted + "\nclean line\n")  # this file itself stays clean
    assert len(diary_lines([page])) == 1


def test_settings_are_read_from_config_at_call_time(monkeypatch):
    from fa_lab.kernels.ladder.flash import plan_splits
    from fa_lab.settings import config

    assert plan_splits(1, 1, 1, 8192, 1, 256, threads=2) > 1
    monkeypatch.setattr(config, "SPLIT_MIN_KEYS", 8192)
    assert plan_splits(1, 1, 1, 8192, 1, 256, threads=2) == 1


SIDE_EFFECTS = r"""
import json, scipy.linalg.cython_blas
from threadpoolctl import threadpool_info
def threads():
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")
before = threads()
import numpy as np
import fa_lab
from fa_lab.kernels.ladder import flash
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
