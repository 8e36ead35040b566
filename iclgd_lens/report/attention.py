"""circuitsvis attention views that use the bundle loaded once per page.

`circuitsvis.attention.attention_patterns(tokens, attention)` returns HTML that either fetches
its code from a CDN (`str()`) or inlines the 1.3 MB bundle into every widget (`.local_src`).
Here a widget is a <div> plus a one-line call to the page-global `CircuitsVis.render`, the
same call circuitsvis' `render_local` makes, with the props serialised by circuitsvis'
own `convert_props` and made safe to sit inside a <script> element.
"""

from __future__ import annotations

import html
from typing import Sequence
from uuid import uuid4

from circuitsvis.utils.convert_props import convert_props


def _script_safe_json(props_json: str) -> str:
    """JSON that cannot end its <script> element or open a comment: <, >, & as \\u escapes."""
    return props_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_widget(element: str, **props) -> str:
    """HTML for one circuitsvis React element (e.g. "AttentionPatterns") using the page bundle."""
    uid = "circuits-vis-" + uuid4().hex[:12]
    props_json = _script_safe_json(convert_props(props))
    return (
        f'<div id="{uid}" class="circuitsvis-widget" style="margin: 15px 0;"></div>\n'
        f'<script>CircuitsVis.render("{uid}", CircuitsVis.{element}, {props_json});</script>'
    )


def attention_patterns_html(tokens: Sequence[str], pattern: Sequence) -> str:
    """An AttentionPatterns view (all heads of one layer) of `pattern`: [heads][query][key].

    circuitsvis puts token strings into the page with React's `dangerouslySetInnerHTML`, so
    they are HTML-escaped here, at the one boundary where they enter the widget: `<s>` shows as
    `<s>` and markup in a token never runs.
    """
    return render_widget(
        "AttentionPatterns", tokens=[html.escape(str(t), quote=True) for t in tokens], attention=pattern
    )


def escape(text: object) -> str:
    """HTML-escaped text (quotes too)."""
    return html.escape(str(text), quote=True)
