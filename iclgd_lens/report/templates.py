"""Plain string templates for report pages: the page shell, sections, tables.

Everything that comes from data goes through `escape` (or pandas' escaping `to_html`).
"""

from __future__ import annotations

import html
import json
from typing import Any, Callable

import pandas as pd

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222; }
header { background: #223; color: #fff; padding: 14px 28px; }
header a { color: #cde; }
header h1 { margin: 0 0 4px 0; font-size: 1.4em; }
main { padding: 10px 28px 40px 28px; max-width: 1200px; }
section { margin: 28px 0; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; }
table.data { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th { background: #f4f4f8; }
table.data td:first-child, table.data th:first-child { text-align: left; }
.headline { display: flex; flex-wrap: wrap; gap: 12px; }
.headline div { background: #f4f4f8; border-radius: 6px; padding: 8px 14px; }
.headline b { display: block; font-size: 1.3em; }
.note { color: #666; font-size: 0.9em; }
.error { color: #a00; }
nav.layers a { display: inline-block; margin: 2px 6px 2px 0; padding: 2px 8px;
  background: #eef; border-radius: 4px; }
pre.config { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.findings { white-space: pre-wrap; }
a.metric { color: inherit; text-decoration: none; border-bottom: 1px dotted #668; }
abbr { text-decoration: none; cursor: help; }
.verdict-text { font-size: 1.08em; line-height: 1.5; background: #f4f6fb; border-left: 4px solid #1f4e9c;
  padding: 10px 14px; }
span.mark { display: block; padding: 1px 4px; border-radius: 3px; }
span.mark-above { background: #dbe8f7; color: #123a78; font-weight: 600; }
span.mark-undecided { background: #f3f3f3; color: #555; }
span.mark-below { background: #f7dede; color: #7a1d1d; font-weight: 600; }
span.mark-undefined, span.mark-none { background: #fff; color: #888; font-style: italic; }
.legend-swatch { display: inline-block; width: 1.6em; height: 0; border-top-width: 3px;
  vertical-align: middle; margin: 0 4px 0 10px; }
table.glossary td, table.glossary th { text-align: left; vertical-align: top; }
.circuitsvis-widget { min-height: 420px; }
"""


BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
"""Unicode's bidirectional controls: U+202E in a prompt or a token shows the text after it
backwards (an index, a label, the next demonstration), so on a page they are made visible."""


def visible_controls(text: str) -> str:
    """`text` with every bidirectional control written as a visible `[U+202E]`, whether raw or as
    the JSON/JavaScript escape `\\u202e` (figure data, widget props). For page content only,
    never for library code: plotly.js uses these escapes in its own regular expressions."""
    for char in BIDI_CONTROLS:
        code = ord(char)
        marker = f"[U+{code:04X}]"
        text = text.replace(char, marker).replace(f"\\u{code:04x}", marker).replace(f"\\u{code:04X}", marker)
    return text


def escape(text: Any) -> str:
    """HTML-escaped text, quotes included."""
    return html.escape(str(text), quote=True)


def page(title: str, header: str, body: str, scripts: str) -> str:
    """A complete HTML page: libraries loaded in <head>, so figure scripts in the body can run.
    Title, header and body (data, figures, widgets; never the libraries) get `visible_controls`."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{visible_controls(escape(title))}</title>
<style>{CSS}</style>
{scripts}
</head>
<body>
<header>{visible_controls(header)}</header>
<main>
{visible_controls(body)}
</main>
</body>
</html>
"""


def section(title: str, inner: str, anchor: str = "", intro: str = "") -> str:
    """A titled section; `title` and `intro` are escaped, `inner` is HTML."""
    anchor_attr = f' id="{escape(anchor)}"' if anchor else ""
    intro_html = f'<p class="note">{escape(intro)}</p>' if intro else ""
    return f"<section{anchor_attr}>\n<h2>{escape(title)}</h2>\n{intro_html}\n{inner}\n</section>"


def table(
    df: pd.DataFrame,
    digits: int = 3,
    cell: Callable[[str, Any], str | None] | None = None,
    blank: str = "",
) -> str:
    """An escaped HTML table of `df` (floats to `digits` decimals, NaN as `blank`).

    `cell(column, value)` may return the HTML of a cell (e.g. a metric name linked to the
    glossary: `glossary.metric_link`), or None for the escaped text.
    """
    if df is None or df.empty:
        return '<p class="note">(empty)</p>'
    if cell is None and not blank:
        return df.to_html(
            index=False,
            classes="data",
            border=0,
            escape=True,
            na_rep="",
            float_format=lambda v: f"{v:.{digits}f}",
        )

    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return escape(blank)
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return escape(value)

    head = "".join(f"<th>{escape(c)}</th>" for c in df.columns)
    rows = []
    for values in df.itertuples(index=False, name=None):
        cells = []
        for column, value in zip(df.columns, values):
            shown = cell(str(column), value) if cell is not None else None
            cells.append(f"<td>{shown if shown is not None else text(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>' + "\n".join(rows) + "</tbody></table>"


def number(value: float, digits: int = 3) -> str:
    """A float for display; NaN (no defined value, e.g. an empty Rec2FTP denominator) as "n/a"."""
    return "n/a" if value != value else f"{value:.{digits}f}"


def headline(numbers: dict[str, float]) -> str:
    """Headline numbers as boxes."""
    if not numbers:
        return ""
    boxes = "".join(f"<div>{escape(k)}<b>{number(v)}</b></div>" for k, v in numbers.items())
    return f'<div class="headline">{boxes}</div>'


def config_block(config: dict) -> str:
    """The configuration as pretty-printed, escaped JSON."""
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    return f'<pre class="config">{escape(text)}</pre>'


def error(text: str) -> str:
    """An error note shown in place of a section's content."""
    return f'<p class="error">{escape(text)}</p>'
