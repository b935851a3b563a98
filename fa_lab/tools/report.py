"""The batch report: run every lesson headless with papermill, write HTML and an index.

``python -m fa_lab report [--quick] [-p NAME=VALUE ...] [--out reports]``

* Notebooks run one after another (never in parallel: they time kernels), each in
  the ``notebooks/`` folder as working directory, with the ``python3`` kernel.
* Each writes its figures and tables to ``<results-dir>/figures`` and ``data/``
  (default: the output folder, ``reports/``, which git ignores): the report never
  modifies tracked files. ``make curate`` passes ``--results-dir .`` to refresh the
  curated figures and tables of ``docs/RESULTS.md``, on purpose.
* The console shows one line per lesson (status, time, verdicts, load); the index
  page shows the same, and flags lessons whose timings ran on a busy machine.
* Outputs go to ``<out>/<name>.ipynb`` and ``<out>/<name>.html`` through temporary
  files moved into place, so a failed or interrupted run never leaves a half-written
  file; ``<out>/index.html`` embeds the key figures and needs no network.
* A failing notebook does not stop the others; the index names it, its failing cell
  and the error, and the command exits with 1. Re-running overwrites in place.

Adding a lesson to the report is one line in :data:`NOTEBOOKS`.
"""

from __future__ import annotations

import ast
import base64
import html
import json
import os
import re
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fa_lab.settings.machine import machine
from fa_lab.numerics.consistency import CONSISTENT, SUSPICIOUS, is_suspicious
from fa_lab.tools import syllabus

#: (notebook stem, key figure stem shown on the index page): one line per lesson.
NOTEBOOKS = [
    ("00_tour", "attention_matrix"),
    ("01_online_softmax", "running_state"),
    ("02_tiling_and_simd", "ladder"),
    ("03_causal_masking", "causal_speedup"),
    ("04_int8_attention", "accuracy_real"),
    ("05_memory_profiling", "peak_vs_N"),
    ("06_performance", "roofline"),
    ("06b_tuning", "decode"),
    ("06c_speed_claims", "claims"),
    ("07_backward", "time_ratio"),
    ("08_decoding_and_retrieval", "decode_latency"),
    ("09_memory_hierarchy", "roofline"),
    ("10_low_precision_microkernels", "speed"),
    ("11_real_model", "retrieval"),
    ("12_gpu_kernel", "occupancy"),
    ("13_merging_states", "cascade_speedup"),
    ("14_kv_cache_quantization", "formats"),
    ("15_programmable_attention", "block_masks"),
]

REPO = Path(__file__).resolve().parents[2]

#: Optional packages a lesson needs (import names). Where one is missing (``make report
#: TORCH=0`` or ``MODELS=0``) the lesson is skipped with the reason, not failed.
REQUIRES = {"11_real_model": ("torch", "transformers", "all_minilm_l6_v2"),
            "12_gpu_kernel": ("numba.cuda",)}


def missing_requirements(name: str) -> list[str]:
    """The import names of :data:`REQUIRES` that this environment lacks for ``name``."""
    import importlib.util

    out = []
    for mod in REQUIRES.get(name, ()):
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            out.append(mod)
    return out

#: The lessons' kernel logs only errors: ipykernel warns "Kernel is running over TCP
#: without encryption" on every start (papermill's kernels listen on localhost only).
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]


@dataclass
class Result:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    error: str = ""
    cell: int | None = None  # index of the failing cell in the source notebook (0-based)
    prompt: int | None = None  # its ``In [n]`` in the executed notebook / HTML
    lesson: dict | None = None  # the lesson's own status file (verdicts, load), if any
    times: dict | None = None  # seconds of the last clean run here, per mode (quick, full)

    @property
    def verdicts(self) -> str:
        """'3 met, 1 not met, 2 inconclusive' (or '' when the lesson judged nothing)."""
        counts: dict = {}
        for v in (self.lesson or {}).get("verdicts", []):
            counts[v["status"]] = counts.get(v["status"], 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())

    @property
    def busy(self) -> bool:
        return bool((self.lesson or {}).get("busy_windows"))

    @property
    def load(self) -> str:
        return (self.lesson or {}).get("load", "")

    @property
    def where(self) -> str:
        if self.cell is None:
            return ""
        prompt = f", In [{self.prompt}]" if self.prompt is not None else ""
        return f"cell {self.cell}{prompt}: "


def parse_params(pairs) -> dict:
    """``["quick=True", "N=2048", "label=abc"]`` -> dict of Python literals (or strings)."""
    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--param must look like NAME=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            params[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key.strip()] = value
    return params


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``:
    a reader (or an interruption) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", re.I)


def to_html(nb, nav: str = "") -> str:
    """Self-contained HTML of an executed notebook: images embedded, no network needed.

    nbconvert's template loads MathJax and require.js from a CDN; the lessons need
    neither (their math is written in Unicode, they use no widgets), so those script
    tags are removed and the page renders the same offline.
    """
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(nb)
    body = _EXTERNAL_SCRIPT.sub("", body)
    if nav:  # the previous / next bar, above and below the lesson
        body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)
        body = body.replace("</body>", nav + "</body>", 1)
    return body


def run_notebook(path: Path, out_dir: Path, params: dict, timeout: int | None,
                 nav: str = "") -> Result:
    """Execute one notebook; write ``<name>.ipynb`` and ``<name>.html`` (with the ``nav``
    bar) atomically."""
    import nbformat
    import papermill as pm

    name = path.stem
    result = Result(name)
    tmp_nb = out_dir / f".{name}.tmp.ipynb"
    t0 = time.perf_counter()
    try:
        try:
            pm.execute_notebook(str(path), str(tmp_nb), parameters=params,
                                cwd=str(path.parent), kernel_name="python3",
                                progress_bar=False, log_output=False,
                                execution_timeout=timeout, extra_arguments=KERNEL_ARGS)
            result.status = "ok"
        except pm.PapermillExecutionError as exc:
            result.status, result.error = "failed", f"{exc.ename}: {exc.evalue}"
        except Exception as exc:  # e.g. CellTimeoutError, a dead kernel, a missing file
            result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - t0
        if tmp_nb.exists():
            nb = nbformat.read(tmp_nb, as_version=4)
            if result.status == "failed":
                result.cell, result.prompt = _error_cell(nb)
            _atomic_write(out_dir / f"{name}.html", to_html(nb, nav))
            os.replace(tmp_nb, out_dir / f"{name}.ipynb")
    finally:  # Ctrl-C or SIGTERM: the previous pages stay, no temporary file is left
        tmp_nb.unlink(missing_ok=True)
    return result


def _error_cell(nb):
    """(index in the source notebook, execution count) of the first cell with an error.

    papermill inserts cells the source does not have: the ``injected-parameters`` cell
    and, on failure, an error banner at the top.
    """
    inserted = {"injected-parameters", "papermill-error-cell-tag"}
    injected = 0
    for i, cell in enumerate(nb.cells):
        if inserted & set(cell.get("metadata", {}).get("tags", [])):
            injected += 1
        elif any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return i - injected, cell.get("execution_count")
    return None, None


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.35em .7em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.ok{color:#1a7f37;font-weight:600}
.failed{color:#c62828;font-weight:600}.skipped{color:#8a6d00;font-weight:600}code{background:#f6f8fa;padding:0 .2em}
figure{display:inline-block;margin:.6em;vertical-align:top;max-width:520px}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
"""


def index_html(results: list[Result], machine: dict, params: dict, key: dict,
               course: dict | None = None) -> str:
    """The report's front page, a syllabus: the paths through the course, one row per
    lesson (aim, what to read first, reading time, run times measured here, this run's
    status and verdicts), the machine, and the key figures inlined. ``course``: ``{name:
    {"title", "aim", "needs", "read_min"}}`` (:mod:`fa_lab.tools.syllabus`)."""
    esc = html.escape
    course = course or {}
    n_ok = sum(r.status == "ok" for r in results)
    mode = _mode(params)

    def lesson_link(n):
        info = course.get(n, {})
        return f'<a href="{n}.html">{esc(syllabus.number(n))} · {esc(info.get("title", n))}</a>'

    rows = []
    for r in results:
        info = course.get(r.name, {})
        links = " ".join(f'<a href="{r.name}.{ext}">{ext}</a>' for ext in ("html", "ipynb"))
        err = ""
        if r.status != "ok":
            err = f"<code>{esc(r.where + r.error)}</code>"
        load = esc(r.load)
        if r.busy:
            load = f'<span class="failed">{load}</span>'
        times = r.times or {}
        run_t = "<br>".join(f"{m}: {times[m]:.0f} s" if m in times else f"{m}: not run yet"
                            for m in ("quick", "full"))
        needs = ", ".join(lesson_link(n) for n in info.get("needs", ())) or "-"
        read = f"{info['read_min']} min" if "read_min" in info else ""
        rows.append(f'<tr><td>{lesson_link(r.name)}<br><small>{esc(r.name)}</small></td>'
                    f'<td>{esc(info.get("aim", ""))}</td><td>{needs}</td><td>{read}</td>'
                    f'<td>{run_t}</td><td class="{r.status}">{r.status}</td>'
                    f"<td>{esc(r.verdicts)}</td><td>{load}</td><td>{links}</td><td>{err}</td></tr>")
    paths = []
    for path, what in syllabus.PATHS.items():
        steps = [n for n in syllabus.path_lessons(path) if n in course]
        if steps:
            paths.append(f"<p><b>{esc(path)}</b>: {esc(what)}</p><ol>"
                         + "".join(f"<li>{lesson_link(n)}</li>" for n in steps) + "</ol>")
    figs = []
    busy = [r.name for r in results if r.busy]
    warn = ""
    if busy:
        warn = (f'<p class="failed">Measured under load: {esc(", ".join(busy))}. Other '
                "processes took CPU time during some of their timings; those verdicts read "
                "<i>inconclusive (machine busy)</i>. Re-run on a quiet machine.</p>")
    for r in results:
        path = key.get(r.name)
        if path and path.exists() and r.status == "ok":
            data = base64.b64encode(path.read_bytes()).decode()
            figs.append(f'<figure><img alt="{esc(path.name)}" src="data:image/png;base64,'
                        f'{data}"><figcaption>{esc(r.name)}: {esc(path.name)}</figcaption>'
                        "</figure>")
    ran = [(r.name, v) for r in results for v in (r.lesson or {}).get("verdicts", [])
           if v.get("status") in (CONSISTENT, SUSPICIOUS)]
    fired = [(n, v) for n, v in ran if is_suspicious(v)]
    unread = [r.name for r in results if not r.lesson]
    checks = ("<ul>" + "".join(f'<li><a href="{esc(n)}.html">{esc(n)}</a>: {esc(v["what"])}: '
                               f'{esc(v["detail"])}</li>' for n, v in fired) + "</ul>"
              if fired else f"<p>none of the {len(ran)} checks that gave a verdict fired.</p>")
    if unread:
        checks += (f"<p>No verdicts were read from: {esc(', '.join(unread))} (failed, "
                   "skipped, or no status file).</p>")
    mrows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                    for k, v in machine.items())
    prm = esc(", ".join(f"{k}={v!r}" for k, v in params.items()) or "(notebook defaults)")
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>fa_lab: the course</title><style>{_CSS}</style></head><body>
<h1>fa_lab: FlashAttention on the CPU, a course</h1>
<p>{n_ok} of {len(results)} lessons ran cleanly ({esc(mode)} mode). Generated
{time.strftime('%Y-%m-%d %H:%M')} with parameters: {prm}. Every number in these pages was
measured on the machine described at the end of this page; on another CPU a verdict may
read the opposite. Reading times are counted from each lesson's prose; run times are this
machine's, per mode, from the last clean run in that mode.</p>
<h2>Two paths through the course</h2>{''.join(paths) or '<p>none</p>'}
<h2>Lessons</h2>{warn}
<table><tr><th>lesson</th><th>aim</th><th>read first</th><th>reading</th>
<th>run time here</th><th>status</th><th>verdicts</th><th>load during its timings</th>
<th>pages</th><th>error</th></tr>
{''.join(rows)}</table>
<h2>Consistency checks that fired</h2>
<p>Numbers of one run that cannot all be right (a rate above its peak, a time below its
floor, one configuration measured far apart, a baseline slower than a rung it should beat,
a planner's choice beaten in its own table): each lesson checks its own and says
<i>suspicious</i> with both numbers.</p>{checks}
<h2>Key figures</h2>{''.join(figs) or '<p>none</p>'}
<h2>The machine</h2><table>{mrows}</table>
</body></html>"""


def run(out="reports", notebooks=None, params=None, results_dir=None, nb_dir=None,
        timeout=1800, show_progress=True) -> list[Result]:
    """Run the lessons (all of :data:`NOTEBOOKS` or the given stems) and write the index.

    ``results_dir`` (default: ``out``) receives each lesson's ``figures/`` and ``data/``.
    With ``show_progress``, prints one line per lesson as it finishes.
    """
    nb_dir = Path(nb_dir or REPO / "notebooks").resolve()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir or out).resolve()
    params = dict(params or {})
    params.setdefault("results_dir", str(results_dir))
    known = dict(NOTEBOOKS)
    names = list(notebooks or known)
    for name in names:
        if not (nb_dir / f"{name}.ipynb").exists():
            raise FileNotFoundError(f"notebook {name!r} not found in {nb_dir}")
    results = []
    before = _load_results(out)  # earlier runs: their run times per mode
    previous = before if notebooks else {}
    mode = _mode(params)
    present = [n for n in list(known) + names if (nb_dir / f"{n}.ipynb").exists()]
    titles = {n: syllabus.title(nb_dir / f"{n}.ipynb") for n in present}
    course_order = [n for n in known if n in titles]
    # The kernels inherit the environment: the lessons' override (nbval's temporary
    # folder, see fa_lab.lessons.notebook) must not send their results elsewhere than here.
    # FA_LAB_STATIC: widgets draw once (the page gets a static figure); FA_LAB_RUN: this
    # run's id, so a lesson may read a table an earlier lesson measured in the same run.
    env = {"FA_LAB_RESULTS_DIR": str(results_dir), "FA_LAB_STATIC": "1",
           "FA_LAB_RUN": f"{os.getpid()}-{time.time_ns()}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for i, name in enumerate(names, 1):
            status_file = results_dir / "data" / f"{name}_status.json"
            started = time.time()
            missing = missing_requirements(name)
            times = dict((before[name].times or {}) if name in before else {})
            if missing:
                result = Result(name, "skipped", error=f"needs {', '.join(missing)} (not installed)",
                                times=times)
                results.append(result)
                if show_progress:
                    print(f"[{i}/{len(names)}] {_line(result)}", flush=True)
                continue
            nav = syllabus.nav_html(name, course_order if name in course_order else names,
                                    titles)
            result = run_notebook(nb_dir / f"{name}.ipynb", out, params, timeout, nav)
            result.lesson = _read_status(status_file, newer_than=started)
            if result.status == "ok":
                times[mode] = round(result.seconds, 1)
            result.times = times
            results.append(result)
            if show_progress:
                print(f"[{i}/{len(names)}] {_line(result)}", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    key = {n: results_dir / "figures" / f"{n}_{stem}.png" for n, stem in known.items()}
    ran = {r.name for r in results}
    listed = [r for n, r in previous.items() if n not in ran] + results
    order = list(known) + list(previous)  # the lessons' order, then earlier runs' order
    listed.sort(key=lambda r: order.index(r.name) if r.name in order else len(order))
    _atomic_write(out / RESULTS_JSON, json.dumps([asdict(r) for r in listed], indent=1))
    course = {n: {"title": titles[n], "aim": syllabus.describe(n).aim,
                  "needs": syllabus.describe(n).needs,
                  "read_min": syllabus.reading_minutes(nb_dir / f"{n}.ipynb")}
              for n in titles}
    _atomic_write(out / "index.html", index_html(listed, machine(), params, key, course))
    return results


def _mode(params: dict) -> str:
    """"quick" or "full": the parameter, or the lessons' ``FA_LAB_QUICK=1`` override."""
    return "quick" if params.get("quick") or os.environ.get("FA_LAB_QUICK") == "1" else "full"


#: The lessons' results of the last runs (``--only`` updates it and the index, lesson by
#: lesson, instead of replacing them).
RESULTS_JSON = "results.json"


def _load_results(out: Path) -> dict:
    """``{name: Result}`` from an earlier run's :data:`RESULTS_JSON` (empty if none)."""
    try:
        rows = json.loads((out / RESULTS_JSON).read_text())
        return {r["name"]: Result(**r) for r in rows}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _read_status(path: Path, newer_than: float = 0.0) -> dict | None:
    """A lesson's status file, if this run wrote it (an older one, left by an earlier or
    an interrupted run, describes that run and is ignored, never deleted)."""
    try:
        if path.stat().st_mtime < newer_than - 1.0:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _line(r: Result) -> str:
    """One console line per lesson: status, time, name, verdicts, load or error."""
    detail = f"  {r.where}{r.error}" if r.status not in ("ok",) else ""
    extra = "; ".join(x for x in (r.verdicts, "MEASURED UNDER LOAD" if r.busy else "") if x)
    return (f"{r.status:>6}  {r.seconds:6.1f} s  {r.name}"
            f"{f'  ({extra})' if extra else ''}{detail}")


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(args) -> int:
    """CLI entry (see ``python -m fa_lab report --help``). SIGTERM is handled as Ctrl-C:
    the lesson that was running keeps its previous pages and no temporary file stays."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    params = parse_params(args.param)
    if args.quick:
        params["quick"] = True
    results = run(out=args.out, notebooks=args.only, params=params,
                  results_dir=args.results_dir)
    print(f"wrote {Path(args.out).resolve() / 'index.html'}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1
