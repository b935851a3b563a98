"""What every figure shares: pyplot, and the machine line under measured figures.

No backend is chosen here: in JupyterLab and under papermill the inline backend shows
every figure in its cell's output (and so in the report's HTML pages); scripts and
tests without a display get matplotlib's own headless fallback (Agg). Selecting Agg at
import replaced the inline backend and left every executed lesson without a figure.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt

__all__ = ["plt", "footer"]


#: Footer font size (points) and the average glyph width as a share of it.
_FOOTER_PT, _GLYPH = 6.5, 0.52


def footer(fig, text: str):
    """The machine line just under a figure's drawn content (every measured figure has one).

    Placed below the tight bounding box of what is already drawn, so tall figures with
    blank space (equal-aspect grids) do not leave a gap, and wrapped to that box's
    width, so a long machine line never widens the saved figure (which would shrink
    the plot in it); save with ``bbox_inches="tight"`` to include it.
    """
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    chars = max(40, int(box.width * 72 / (_FOOTER_PT * _GLYPH)))
    wrapped = "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False))
    fig.text(box.x0 / fig.get_figwidth(), box.y0 / fig.get_figheight() - 0.01, wrapped,
             fontsize=_FOOTER_PT, color="dimgray", ha="left", va="top")
    return fig

