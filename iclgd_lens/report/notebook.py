"""Figures inline in notebooks, with no network: Jupyter Notebook, JupyterLab, VS Code and the
HTML that nbconvert exports.

plotly's own notebook renderers either fetch plotly.js from a CDN ("notebook_connected") or
emit only `application/vnd.plotly.v1+json`, which is blank where no plotly extension is
installed and in exported HTML. Here a figure is plain `text/html`: a <div> and a script that
draws it with the page's `Plotly`, waiting until the library is there. The library itself is
embedded with the first figure of every cell that shows one (`figure_html`), so that each cell's
output draws on its own: re-running, clearing or deleting another cell, or exporting a notebook
whose first figure cell was re-run, leaves no figure waiting for a library that is gone (about
4.6 MB per figure cell; `use(library="once")` embeds it once per kernel session instead). It is
hidden from RequireJS so that the classic Notebook gets a global `Plotly` too.

    from iclgd_lens.report import notebook
    notebook.use()        # plotly figures shown in cells render with this renderer
    fig                   # ... like this
    notebook.show(fig)    # or explicitly
"""

from __future__ import annotations

import json
import uuid

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

from iclgd_lens.errors import IclgdError
from iclgd_lens.report.assets import plotly_js
from iclgd_lens.report.templates import visible_controls

RENDERER = "iclgd"
_CONFIG = {"displaylogo": False, "responsive": True}
LIBRARY_MODES = ("cell", "once")
_state: dict = {"library": "cell", "sent_in": None}
"""`library`: embed plotly.js once per cell ("cell") or once per kernel session ("once");
`sent_in`: the output (see `_output_key`) that last embedded it, None before any."""


def _output_key() -> tuple:
    """Which output a figure lands in, as far as embedding the library goes: in "cell" mode the
    executing cell (IPython's execution count; a re-run is a new count), in "once" mode, or outside
    IPython, the whole session."""
    if _state["library"] == "once":
        return ("session",)
    try:
        from IPython import get_ipython
    except ImportError:
        return ("session",)
    shell = get_ipython()
    return ("cell", shell.execution_count) if shell is not None else ("session",)


def _script_safe(text: str) -> str:
    """JSON that cannot end its <script> element or open a comment: <, >, & as \\u escapes;
    bidirectional controls made visible (`templates.visible_controls`)."""
    return visible_controls(text).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def library_html() -> str:
    """plotly.js (from the installed plotly package) as a <script>, with RequireJS' `define`
    hidden while it loads so that it sets `window.Plotly` in every front-end."""
    return (
        "<script>window.__iclgdDefine = window.define; window.define = undefined;</script>\n"
        f"<script>{plotly_js()}</script>\n"
        "<script>window.define = window.__iclgdDefine;</script>"
    )


def figure_html(fig: go.Figure, *, include_library: bool | None = None, height: int | None = None) -> str:
    """`fig` as a self-drawing HTML fragment. `include_library`: embed plotly.js with it (None:
    only if no figure of this cell, or with `use(library="once")` of this session, has embedded
    it yet)."""
    key = _output_key()
    if include_library is None:
        include_library = _state["sent_in"] != key
    uid = "iclgd-fig-" + uuid.uuid4().hex[:12]
    fig_json = _script_safe(pio.to_json(fig, validate=False))
    config = json.dumps(_CONFIG)
    h = height or fig.layout.height or 450
    draw = (
        f'<div id="{uid}" class="plotly-graph-div" style="height:{int(h)}px; width:100%;"></div>\n'
        "<script>(function () {\n"
        f"  var fig = {fig_json};\n"
        "  function draw() {\n"
        f'    var el = document.getElementById("{uid}");\n'
        "    if (!el) return;\n"
        f"    if (window.Plotly) {{ window.Plotly.newPlot(el, fig.data, fig.layout, {config}); }}\n"
        "    else { setTimeout(draw, 50); }\n"
        "  }\n"
        "  draw();\n"
        "})();</script>"
    )
    if include_library:
        _state["sent_in"] = key
        return library_html() + "\n" + draw
    return draw


class InlineRenderer(MimetypeRenderer):
    """A plotly renderer that returns `figure_html` as text/html (registered as "iclgd")."""

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        return {"text/html": figure_html(go.Figure(fig_dict))}


pio.renderers[RENDERER] = InlineRenderer()


def use(library: str = "cell") -> None:
    """Make the inline renderer plotly's default for this session (figures in cells use it).

    `library`: "cell" (default) embeds plotly.js with the first figure of every cell that shows
    one, so every figure cell draws on its own, after re-runs and in exports; "once" embeds it
    once per kernel session (smaller notebooks; a figure then draws only while the cell that
    embedded it keeps its output, so re-running or clearing that cell blanks the others on reopening)."""
    if library not in LIBRARY_MODES:
        raise IclgdError(f"library must be one of {', '.join(LIBRARY_MODES)}, got {library!r}")
    _state["library"], _state["sent_in"] = library, None
    pio.renderers.default = RENDERER


class _HTML:
    """What `show` displays: an object with a text/html representation."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text


def show(fig: go.Figure) -> None:
    """Display `fig` inline when running in IPython/Jupyter (a plain script shows nothing)."""
    if not isinstance(fig, go.Figure):
        raise IclgdError(
            "nothing to show: expected a plotly Figure, got "
            + (
                "None (the figure builder found nothing to draw in these results)"
                if fig is None
                else type(fig).__name__
            )
        )
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display(_HTML(figure_html(fig)))
