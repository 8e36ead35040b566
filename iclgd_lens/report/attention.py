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


LOOKALIKES = str.maketrans({"<": "\u2039", ">": "\u203a", "&": "\uff06", '"': "\u201d", "'": "\u2019"})
"""HTML's special characters -> look-alikes every common font has (‹ › ＆ ” ’)."""


def inert_token(token: object) -> str:
    """A token as text that is the same whether it is read as HTML or drawn as plain text.

    circuitsvis shows each token twice: in token lists through React's `dangerouslySetInnerHTML`
    (HTML: an escaped `&lt;s&gt;` shows as `<s>`, a raw `<img onerror>` would run) and as axis
    labels drawn on a canvas (plain text: `&lt;s&gt;` shows literally). Replacing the five
    characters HTML gives a meaning to by look-alikes (`LOOKALIKES`) reads the same in both and
    leaves nothing to interpret: `<s>` shows as `‹s›`.
    """
    return str(token).translate(LOOKALIKES)


def attention_patterns_html(tokens: Sequence[str], pattern: Sequence, large: bool = True) -> str:
    """An attention view of all heads of one layer, `pattern`: [heads][query][key].

    `large` (the default): circuitsvis' AttentionHeads, a head selector and the chosen head
    zoomed to the page width with every token labelled; otherwise the compact
    AttentionPatterns. Tokens enter the widget through `inert_token`, at the one boundary where
    they enter it: markup in a token never runs, and it reads the same in every part of the view.
    """
    shown = [inert_token(t) for t in tokens]
    if large:
        return render_widget(
            "AttentionHeads",
            tokens=shown,
            attention=pattern,
            attentionHeadNames=[f"head {h}" for h in range(len(pattern))],
            maskUpperTri=True,
        )
    return render_widget("AttentionPatterns", tokens=shown, attention=pattern)


def escape(text: object) -> str:
    """HTML-escaped text (quotes too)."""
    return html.escape(str(text), quote=True)
