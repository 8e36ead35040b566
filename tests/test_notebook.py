"""The tutorial as a notebook: built from docs/tutorial.py's `# %%` cells with nbformat, executed
with nbclient on this environment's python3 kernel, end to end on the embedded model.

Its outputs must hold inline HTML figures: text/html with a plotly div and, once per figure cell,
the embedded plotly.js (no CDN, no `application/vnd.plotly.v1+json`-only output that exported HTML and
front-ends without the plotly extension show blank). The outputs, put together in order as an
exported page is, are then opened offline in Chromium (when it is installed) and every figure
must draw.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from iclgd_lens.report.assets import plotly_js
from iclgd_lens.report.templates import escape

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.py"
PLOTLY_MARK = "plotly.js v"  # the bundle's licence banner
ARTIFACTS = Path(__file__).parent / "artifacts"


def tutorial_notebook(path: Path = TUTORIAL) -> nbformat.NotebookNode:
    """docs/tutorial.py as a notebook: one cell per `# %%` block (markdown for `# %% [markdown]`,
    the leading `# ` of each line dropped)."""
    cells = []
    for block in re.split(r"^# %%", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
        header, _, body = block.partition("\n")
        if header.strip() == "[markdown]":
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines()
            )
            cells.append(nbformat.v4.new_markdown_cell(text.strip()))
        elif body.strip():
            cells.append(nbformat.v4.new_code_cell(body.strip("\n")))
    return nbformat.v4.new_notebook(
        cells=cells,
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
    )


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> nbformat.NotebookNode:
    nb = tutorial_notebook()
    assert sum(c.cell_type == "code" for c in nb.cells) >= 5
    work = tmp_path_factory.mktemp("notebook")
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}}
    ).execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    return nb


def html_outputs(nb) -> list[str]:
    return [
        out["data"]["text/html"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "data" in out and "text/html" in out["data"]
    ]


def test_the_tutorial_runs_as_a_notebook_and_its_figures_are_inline_html(executed):
    htmls = html_outputs(executed)
    figures = [h for h in htmls if 'class="plotly-graph-div"' in h]
    assert len(figures) >= 3  # the Results view, the small multiples, the layer curve
    for cell in executed.cells:  # plotly.js once in every cell that shows a figure, with its first
        outs = [o["data"]["text/html"] for o in cell.get("outputs", []) if "text/html" in o.get("data", {})]
        shown = [h for h in outs if 'class="plotly-graph-div"' in h]
        assert sum(PLOTLY_MARK in h for h in outs) == (1 if shown else 0)
        assert not shown or PLOTLY_MARK in shown[0]
    for h in htmls:
        ours = h.replace(plotly_js(), "")  # what the outputs add around the library
        assert not re.search(r"(src|href)=[\"']?https?://", ours), (
            "an output loads something from the network"
        )
        assert not re.search(r"https?://(cdn|unpkg)", ours)
    results_view = next(h for h in htmls if "iclgd-lens Results" in h)
    assert "Paired sign-flip tests" in results_view  # the verdict first, in the notebook too
    assert re.search(r"\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]", results_view)  # numbers with intervals
    for cell in executed.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error"
            if "application/vnd.plotly.v1+json" in out.get("data", {}):
                assert "text/html" in out["data"], "a figure only the plotly extension can show"


def test_the_notebook_figures_draw_offline_in_exported_html(executed, tmp_path):
    """The outputs in order on one page, as an HTML export puts them, opened offline: every figure
    draws, no console error, no request beyond file:."""
    chromium = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed but CI=true", pytrace=False)
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    parts = []
    for cell in executed.cells:
        if cell.cell_type == "markdown":
            parts.append(f"<pre>{escape(cell.source)}</pre>")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/html" in data:
                parts.append(f'<div class="output_html">{data["text/html"]}</div>')
            elif "text/plain" in data or "text" in out:
                parts.append(f"<pre>{escape(data.get('text/plain', out.get('text', '')))}</pre>")
    page = tmp_path / "tutorial.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>tutorial</title></head><body>'
        + "\n".join(parts)
        + "</body></html>",
        encoding="utf-8",
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(offline=True)
            tab = context.new_page()
            errors, requests = [], []
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(page.as_uri())
            tab.wait_for_function(
                "() => [...document.querySelectorAll('.plotly-graph-div')].every("
                "g => g.querySelector('svg.main-svg'))",
                timeout=60_000,
            )
            drawn = tab.evaluate("document.querySelectorAll('.plotly-graph-div svg.main-svg').length")
            ARTIFACTS.mkdir(exist_ok=True)
            tab.screenshot(path=str(ARTIFACTS / "notebook_export.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    assert drawn >= 3


def test_the_results_view_draws_its_figure_inline_and_the_engine_does_not_import_the_report():
    """Results._repr_html_ leads with the verdict and carries an inline HTML figure; outside
    IPython plotly.js is embedded with the first figure of the session only; importing the engine
    loads no report code."""
    import subprocess
    import sys

    from test_results import make_results

    from iclgd_lens.report import notebook

    notebook._state["sent_in"] = None  # a fresh session (outside IPython: once per session)
    first = make_results(n_layers=2, n_episodes=8)._repr_html_()
    second = make_results(n_layers=2, n_episodes=8)._repr_html_()
    assert first.index("Paired sign-flip tests") < first.index('class="plotly-graph-div"')
    assert PLOTLY_MARK in first and PLOTLY_MARK not in second and 'class="plotly-graph-div"' in second
    assert "above all baselines" in first and re.search(r"\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]", first)
    code = (
        "import sys, iclgd_lens.engine.results; "
        "print([m for m in sys.modules if m.startswith('iclgd_lens.report')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_results_views_means_are_layer_level_and_name_what_is_missing():
    """The notebook view's metric x comparison table holds the layer-level (head -1) episode means
    only, per-head rows not counted in, and says "n/a" where a comparison has no number."""
    from html.parser import HTMLParser

    from test_results import make_results

    from iclgd_lens.engine import stats

    class Cells(HTMLParser):  # the table's rows as lists of cell texts
        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.rows[-1].append(self.cell.strip())
                self.cell = None

    results = make_results(n_layers=2, n_episodes=6)
    view = results._repr_html_()
    parser = Cells()
    parser.feed(view[view.index("<details>") :])
    header, cells = parser.rows[0], {row[0]: row for row in parser.rows[2:]}  # row 1: the index name
    t = results.table
    want = stats.episode_summary(t[t["head"] == -1], ["metric", "comparison"])
    checked = 0
    for row in want.itertuples():
        if row.metric in cells and row.comparison in header:
            assert cells[row.metric][header.index(row.comparison)] == f"{row.mean:.3f}"
            checked += 1
    assert checked >= 10
    assert all(c != "" for row in cells.values() for c in row[1:])
    assert "n/a" in view[view.index("<details>") :]


def _library_per_cell(nb) -> list[int]:
    return [
        sum(PLOTLY_MARK in o.get("data", {}).get("text/html", "") for o in cell.get("outputs", []))
        for cell in nb.cells
    ]


@pytest.mark.parametrize("library", ["cell", "once"])
def test_re_running_a_figure_cell_leaves_every_figure_cell_able_to_draw(library, tmp_path):
    """A user re-runs the first figure cell: in "cell" mode (the default) every figure cell still
    embeds plotly.js itself, so the saved or exported notebook draws all of them (with one copy
    per session, the re-run cell had taken the only copy with it: blank figures on reopening);
    "once" embeds it once, as documented."""
    setup = (
        "import plotly.graph_objects as go\n"
        "from iclgd_lens.report import notebook\n"
        + ("notebook.use()\n" if library == "cell" else "notebook.use(library='once')\n")
        + "fig = go.Figure(go.Scatter(y=[1, 3, 2]))"
    )
    cells = [setup, "fig", "notebook.show(fig)\nfig"]
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c) for c in cells],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
    )
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        first = _library_per_cell(nb)
        client.execute_cell(nb.cells[1], 1)  # the first figure cell, run again
        again = _library_per_cell(nb)
    if library == "cell":
        assert first == again == [0, 1, 1]
    else:
        assert first == [0, 1, 0] and again == [0, 0, 0]


def test_an_unknown_library_mode_is_one_line():
    from iclgd_lens.errors import IclgdError
    from iclgd_lens.report import notebook

    with pytest.raises(IclgdError, match="library must be one of cell, once"):
        notebook.use(library="every")
