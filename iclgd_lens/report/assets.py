"""The JavaScript a report needs, taken from the installed packages (never a CDN).

A report folder holds each library once, under `assets/`; pages point at it with a classic
`<script src>` (works from file://, unlike module scripts). A single-file report inlines each
library once instead.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PLOTLY_JS = "plotly.min.js"
CIRCUITSVIS_JS = "circuitsvis.js"


def _safe_for_inline(js: str) -> str:
    """JavaScript that can sit inside a <script> element: `</script` cannot close it early.

    `<\\/script` means the same in JS strings and regular expressions.
    """
    return js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as shipped with the installed `plotly` package."""
    from plotly.offline import get_plotlyjs

    return _safe_for_inline(get_plotlyjs())


@lru_cache(maxsize=1)
def circuitsvis_js() -> str:
    """The circuitsvis browser bundle (IIFE defining the global `CircuitsVis`).

    The same file `circuitsvis.utils.render.render_local` inlines into every widget; here it
    is loaded once per page. The source-map comment is dropped (the map is not shipped).
    """
    import circuitsvis

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = bundle.read_text(encoding="utf-8")
    js = "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL="))
    return _safe_for_inline(js)


def write_assets(assets_dir: Path) -> list[Path]:
    """Write plotly.js and the circuitsvis bundle into `assets_dir`; return the files."""
    assets_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in ((PLOTLY_JS, plotly_js()), (CIRCUITSVIS_JS, circuitsvis_js())):
        path = assets_dir / name
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return files


def script_tags(single_file: bool, prefix: str = "assets/") -> str:
    """The <script> elements that load both libraries: links to assets/, or the code inline."""
    if single_file:
        return f"<script>{plotly_js()}</script>\n<script>{circuitsvis_js()}</script>"
    return f'<script src="{prefix}{PLOTLY_JS}"></script>\n<script src="{prefix}{CIRCUITSVIS_JS}"></script>'
