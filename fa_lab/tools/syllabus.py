"""The course's map: each lesson's aim, what to read first, the paths through the
lessons, and the times a learner plans with. The report renders it as its index and as
the previous / next bar of every lesson page.

What is written here is what a lesson *teaches* (its aim), never what a run measured:
the measured outcomes (verdicts, run times) come from the run. Reading time is counted
from the lesson's own prose (:data:`WORDS_PER_MINUTE`, plus :data:`MINUTES_PER_FIGURE_CELL`
for each code cell, where the reader looks at a table or a figure); run times are the
ones measured on this machine, per mode (quick or full), kept from run to run in the
report's results file, so a mode not yet run here reads "not run yet".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

#: Prose read per minute, and minutes to look at each code cell's table or figure.
WORDS_PER_MINUTE = 180
MINUTES_PER_FIGURE_CELL = 0.5


@dataclass(frozen=True)
class Lesson:
    """One lesson: its notebook stem, aim (one line), the lessons to read first, and
    the paths (:data:`PATHS`) it belongs to."""

    name: str
    aim: str
    needs: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


#: The two ways through the course, in reading order.
PATHS = {
    "core": ("The algorithm: FlashAttention from the online softmax to decoding, "
             "merging and masks"),
    "performance": ("The performance engineer's path: memory, throughput, the memory "
                    "hierarchy, low precision and the GPU, on this machine"),
}

LESSONS = [
    Lesson("00_tour", "The whole lab once: exact attention, the kernel ladder, one timing "
           "judged by a computed verdict.", (), ("core", "performance")),
    Lesson("01_online_softmax", "Softmax in one pass with a running max and sum: the "
           "idea FlashAttention is built on.", ("00_tour",), ("core",)),
    Lesson("02_tiling_and_simd", "From a scalar loop to tiled, vectorized kernels, read "
           "in the assembly, and which vector width this CPU gets.", ("01_online_softmax",),
           ("core", "performance")),
    Lesson("03_causal_masking", "Causal and other masks: which tiles are skipped, and what "
           "skipping saves here.", ("02_tiling_and_simd",), ("core",)),
    Lesson("04_int8_attention", "INT8 Q and K: scales, smoothing, and the accuracy cost on "
           "real activations.", ("01_online_softmax",), ("performance",)),
    Lesson("05_memory_profiling", "The O(N²) scores of standard attention against "
           "FlashAttention's O(N), predicted and measured with memray.", ("00_tour",),
           ("performance",)),
    Lesson("06_performance", "How fast the fastest kernel is, and why: the ladder against "
           "PyTorch, throughput under the measured peak, where the time goes, threads.",
           ("02_tiling_and_simd", "05_memory_profiling"), ("performance",)),
    Lesson("06b_tuning", "Block sizes, key splits and decode paths chosen by measurement "
           "on this machine, and the tuning file later lessons read.",
           ("06_performance",), ("performance",)),
    Lesson("06c_speed_claims", "Published FlashAttention speed claims re-measured here and "
           "judged against their stated range.", ("06_performance",), ("performance",)),
    Lesson("07_backward", "The backward pass by recomputation from the saved log-sum-exp, "
           "checked against float64.", ("01_online_softmax", "03_causal_masking"), ("core",)),
    Lesson("08_decoding_and_retrieval", "Decoding with a KV cache and RoPE, split-KV, "
           "paged caches, and attention as top-K retrieval.", ("03_causal_masking",),
           ("core",)),
    Lesson("09_memory_hierarchy", "Bandwidth per cache level, FlashAttention's IO count "
           "and a measured roofline of every kernel.", ("06_performance",), ("performance",)),
    Lesson("10_low_precision_microkernels", "Does low precision pay on this CPU? INT8 and "
           "BF16 micro-kernels, peaks per precision, AMX tiles where present.",
           ("04_int8_attention", "09_memory_hierarchy"), ("performance",)),
    Lesson("11_real_model", "fa_lab inside real models through transformers: the same "
           "outputs as SDPA, retrieval with INT8, a decoder generating.",
           ("08_decoding_and_retrieval",), ("core",)),
    Lesson("12_gpu_kernel", "The same algorithm on a GPU: FlashAttention-2 in numba.cuda, "
           "shared memory and occupancy.", ("02_tiling_and_simd", "03_causal_masking"),
           ("performance",)),
    Lesson("13_merging_states", "Merging attention states through their LSEs: split-KV, "
           "shared prefixes, ring attention across processes.",
           ("08_decoding_and_retrieval",), ("core",)),
    Lesson("14_kv_cache_quantization", "Decoding is bytes: int8 and int4 KV caches, their "
           "accuracy, and time against context length.",
           ("04_int8_attention", "08_decoding_and_retrieval"), ("performance",)),
    Lesson("15_programmable_attention", "score_mod, mask_mod and block masks: every mask "
           "and bias as one small function, compiled.", ("03_causal_masking",), ("core",)),
]

BY_NAME = {lesson.name: lesson for lesson in LESSONS}


def path_lessons(path: str) -> list[str]:
    """The lessons of one path (:data:`PATHS`), in the course's order."""
    if path not in PATHS:
        raise ValueError(f"path: one of {sorted(PATHS)}, got {path!r}")
    return [lesson.name for lesson in LESSONS if path in lesson.paths]


def number(name: str) -> str:
    """The lesson's number as the course shows it: ``"06b"`` for ``"06b_tuning"``."""
    return name.split("_", 1)[0]


def title(notebook: Path) -> str:
    """The lesson's title: the first Markdown heading of its notebook, without the ``#``,
    the number and code quotes (``"Causal masking"``); the stem if it has none."""
    nb = json.loads(Path(notebook).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                m = re.match(r"#+\s*(?:\d+[a-z]?\s*·\s*)?(.+)", line)
                if m:
                    return m.group(1).replace("`", "").strip()
    return Path(notebook).stem


def reading_minutes(notebook: Path) -> int:
    """Minutes to read the lesson: its Markdown words at :data:`WORDS_PER_MINUTE`, plus
    :data:`MINUTES_PER_FIGURE_CELL` per code cell, rounded up."""
    nb = json.loads(Path(notebook).read_text())
    words = sum(len("".join(c["source"]).split()) for c in nb["cells"]
                if c["cell_type"] == "markdown")
    code = sum(c["cell_type"] == "code" for c in nb["cells"])
    return max(1, math.ceil(words / WORDS_PER_MINUTE + code * MINUTES_PER_FIGURE_CELL))


def neighbours(name: str, order: list[str]) -> tuple[str | None, str | None]:
    """The lessons before and after ``name`` in ``order`` (None at either end, or when
    ``name`` is not in it)."""
    if name not in order:
        return None, None
    i = order.index(name)
    return (order[i - 1] if i > 0 else None), (order[i + 1] if i + 1 < len(order) else None)


def nav_html(name: str, order: list[str], titles: dict[str, str]) -> str:
    """The previous / index / next bar of a lesson page (plain links, no script)."""
    import html

    prev, nxt = neighbours(name, order)

    def link(n, arrow_left):
        if n is None:
            return "<span></span>"
        text = html.escape(f"{number(n)} · {titles.get(n, n)}")
        return f'<a href="{n}.html">{"← " + text if arrow_left else text + " →"}</a>'
    return ('<nav class="fa-lab-nav" style="display:flex;justify-content:space-between;'
            'gap:1em;padding:.5em 1em;margin:.5em 0;background:#f3f5f8;border-radius:6px;'
            f'font-family:system-ui,sans-serif">{link(prev, True)}'
            '<a href="index.html">course index</a>'
            f"{link(nxt, False)}</nav>")


def describe(name: str) -> Lesson:
    """The syllabus entry of a lesson (a bare entry for a notebook outside the course)."""
    return BY_NAME.get(name, Lesson(name, ""))
