"""One visual language for every figure of every page (index, layer pages, studies, sweeps).

- One colour per comparison or condition, the same in every figure: `icl~gd` (the headline)
  strong and solid, the floors (random vector, random update of equal norm, untrained model)
  muted and dashed, the ICL~ICL ceiling (`icl~icl_perm`) distinct and dotted. Names not listed
  get a muted colour picked from the name itself (a stable hash), so they too keep it.
- `TEMPLATE`: the plotly template (fonts, grid, hover, legend) every figure uses.
- `log2_k_axis(ks)`: a log-2 axis with every k labelled (no "8 9 1 2 3" minor ticks).
- `layer_axis(layers)`: whole-number layer ticks (no 0.5).
- `restyle(fig)`: the above applied to a figure built elsewhere (a study's, a sweep's), by its
  trace names, without touching its data.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Any, Iterable, Mapping

import plotly.graph_objects as go
import plotly.io as pio

HEADLINE = "icl~gd"
CEILING = "icl~icl_perm"
FLOORS = ("icl~random", "icl~random_update", "untrained:icl~gd")

#: name -> (colour, dash, width): comparisons first, then the conditions and the study methods.
STYLES: dict[str, tuple[str, str, float]] = {
    HEADLINE: ("#1f4e9c", "solid", 3.0),  # the answer: dark blue, strong
    CEILING: ("#2a9d5c", "dot", 2.2),  # the ceiling: green, dotted
    "icl~random_update": ("#8c8c8c", "dash", 1.6),  # floors: greys and a muted brown, dashed
    "icl~random": ("#b3b3b3", "dashdot", 1.6),
    "untrained:icl~gd": ("#b59a7a", "longdash", 1.6),
    "icl~dual_form": ("#8e6bb8", "solid", 2.0),
    "icl~zsl": ("#d9a33f", "dash", 1.6),
    "gd~zsl": ("#a97fc4", "dash", 1.6),
    # conditions (accuracy per condition, top tokens, attention views)
    "zsl": ("#8c8c8c", "solid", 2.0),
    "icl": ("#e07b24", "solid", 2.4),  # ICL: orange
    "gd": ("#6a51a3", "solid", 2.4),  # GD: purple
}
_MUTED = ("#7f9cbf", "#c4a35a", "#8fb08c", "#c28080", "#9b8fc2", "#7fb8b8", "#b8a07f", "#a0a0c8")
ICL_COLOUR, GD_COLOUR, ZSL_COLOUR = STYLES["icl"][0], STYLES["gd"][0], STYLES["zsl"][0]
DIVERGING = "RdBu_r"  # signed values (similarities, dW entries): red positive, blue negative, white 0
SEQUENTIAL = "Viridis"


def _alias(name: str) -> str:
    """The style key of a trace name: "icl~gd (k=8)" -> "icl~gd", "gd_b1" -> "gd", "ICL - ZSL" -> "icl"."""
    text = str(name).strip()
    low = text.lower()
    if low in STYLES:
        return low
    head = low.split(" ")[0].split(",")[0]
    if head in STYLES:
        return head
    for prefix in ("icl", "gd", "zsl"):
        if head.startswith(prefix + "_") or head == prefix or low.startswith(prefix + " -"):
            return prefix
    return low


_SHADES = {  # variants of a condition (e.g. GD at several batch sizes): shades of its colour
    "gd": ("#3f007d", "#6a51a3", "#8c7fc0", "#b1a8d6", "#54278f", "#9e9ac8"),
    "icl": ("#a63603", "#e07b24", "#f5a25d", "#fdc28c"),
}
_KNOWN_VARIANTS = ("gd_b1", "gd_b2", "gd_b4", "gd_full", "gd_b8", "gd_b16")


def _variant_colour(name: str) -> str | None:
    """A shade of ICL's or GD's colour for a variant name such as "gd_b2" (None otherwise)."""
    low = str(name).strip().lower().split(",")[0].split(" ")[0]
    for base, shades in _SHADES.items():
        if low.startswith(base + "_"):
            index = _KNOWN_VARIANTS.index(low) if low in _KNOWN_VARIANTS else zlib.crc32(low.encode())
            return shades[index % len(shades)]
    return None


def colour(name: str, alpha: float = 1.0) -> str:
    """The colour of a comparison/condition `name` in every figure (rgba with `alpha`); variants
    of a condition ("gd_b1", "gd_full") in shades of its colour."""
    key = _alias(name)
    hex_colour = _variant_colour(name) or (
        STYLES[key][0] if key in STYLES else _MUTED[zlib.crc32(key.encode()) % len(_MUTED)]
    )
    r, g, b = (int(hex_colour[j : j + 2], 16) for j in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def line(name: str) -> dict[str, Any]:
    """plotly `line=` settings of `name`: its colour, dash and width (headline strong and solid)."""
    key = _alias(name)
    _, dash, width = STYLES.get(key, ("", "dash", 1.6))
    return dict(color=colour(name), dash=dash, width=width)


def marker_symbol(name: str) -> str:
    """Circles for the headline and conditions, open shapes for baselines (readable in grey print)."""
    key = _alias(name)
    if key == HEADLINE or key in ("icl", "gd", "zsl"):
        return "circle"
    return "diamond-open" if key == CEILING else "square-open"


def rank(name: str) -> int:
    """Legend and drawing order: the headline first, then the ceiling, then the floors, then the rest."""
    key = _alias(name)
    if key == HEADLINE:
        return 0
    if key == CEILING:
        return 1
    if key in FLOORS:
        return 2 + FLOORS.index(key)
    return 10


def order(names: Iterable[str]) -> list[str]:
    """`names` in `rank` order (then alphabetically): the same order, legend and colours everywhere."""
    return sorted(dict.fromkeys(names), key=lambda n: (rank(n), str(n)))


TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.update(
    font=dict(family='-apple-system, "Segoe UI", Helvetica, Arial, sans-serif', size=13, color="#222"),
    title=dict(font=dict(size=15), x=0.0, xanchor="left"),
    colorway=[colour(n) for n in ("icl~gd", "icl", "gd", "icl~icl_perm")] + [colour(m) for m in _MUTED],
    hoverlabel=dict(namelength=-1),
    legend=dict(title=dict(text=""), bgcolor="rgba(255,255,255,0.7)"),
    margin=dict(l=64, r=24, t=56, b=52),
    xaxis=dict(showline=True, linecolor="#999", ticks="outside", zeroline=False),
    yaxis=dict(showline=True, linecolor="#999", ticks="outside", zerolinecolor="#ccc"),
)
pio.templates["iclgd"] = TEMPLATE


def log2_k_axis(ks: Iterable[int | float], title: str = "k (demonstrations, log2 scale)") -> dict[str, Any]:
    """An x axis for k: log scale, one labelled tick at every k present (and only there).

    plotly's log axis otherwise labels minor ticks with leading digits ("8 9 1 2 3 ... 10 2 3")
    and leaves powers of two unlabelled. k = 0 has no place on a log axis: pass positive ks.
    """
    values = sorted({float(k) for k in ks if k is not None and not math.isnan(float(k)) and float(k) > 0})
    ticks = [int(v) if v == int(v) else v for v in values]
    lo, hi = (values[0], values[-1]) if values else (1.0, 2.0)
    pad = 0.25
    return dict(
        title=title,
        type="log",
        tickmode="array",
        tickvals=ticks,
        ticktext=[str(t) for t in ticks],
        minor=dict(showgrid=False, ticks=""),
        range=[math.log10(lo) - pad * math.log10(2), math.log10(hi) + pad * math.log10(2)],
    )


def layer_axis(layers: Iterable[int] | None = None, title: str = "layer") -> dict[str, Any]:
    """An axis of whole layers: a tick at every layer (never at 0.5)."""
    axis: dict[str, Any] = dict(title=title, tickmode="linear", dtick=1, tick0=0, tickformat="d")
    if layers is not None:
        ls = sorted({int(l) for l in layers})
        if ls:
            axis["range"] = [ls[0] - 0.3, ls[-1] + 0.3]
    return axis


def _is_layer_axis(axis: Any) -> bool:
    title = (axis.title.text or "") if axis.title else ""
    return title.strip().lower() in ("layer", "layers")


def _k_values(fig: go.Figure, axis_name: str) -> list[float]:
    ref = "x" if axis_name == "xaxis" else "x" + axis_name[len("xaxis") :]
    values: list[float] = []
    for trace in fig.data:
        if getattr(trace, "xaxis", "x") in (ref, None) and getattr(trace, "x", None) is not None:
            values += [float(v) for v in trace.x if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    return values


def restyle(fig: go.Figure, names: Mapping[str, str] | None = None) -> go.Figure:
    """`fig` in the report's style (in place, returned): the template; every trace named after a
    comparison or condition in its colour, dash and marker; log k axes with every k labelled;
    layer axes on whole layers. Data are untouched. `names`: trace name -> style key, where a
    figure's names are not the keys themselves."""
    fig.update_layout(template=TEMPLATE)
    dashes = {t.line.dash for t in fig.data if t.type in ("scatter", "scattergl") and t.line.dash}
    dash_encodes = len(dashes) > 1
    for trace in fig.data:
        name = (names or {}).get(trace.name, trace.name) if trace.name is not None else None
        if name is None:
            continue
        key = _alias(name)
        known = key in STYLES
        if trace.type in ("scatter", "scattergl"):
            fill = getattr(trace, "fill", None)
            if fill in ("toself", "tonexty", "tozeroy"):
                if known:
                    trace.fillcolor = colour(name, 0.15)
                continue
            if known:
                settings = line(name)
                if dash_encodes:  # a figure that encodes another variable by dash keeps it
                    settings.pop("dash")
                trace.line.update(settings)
                if trace.mode and "markers" in trace.mode:
                    trace.marker.color = colour(name)
        elif trace.type in ("bar", "box", "violin", "histogram") and known:
            trace.marker.color = colour(name)
            if trace.type in ("box", "violin"):
                trace.line.color = colour(name)
    layout = fig.layout
    for axis_name in [a for a in layout.to_plotly_json() if a.startswith("xaxis")] or ["xaxis"]:
        axis = layout[axis_name]
        if axis.type == "log":  # ticks a figure set itself (e.g. ks without data) are kept
            ks = [float(v) for v in axis.tickvals] if axis.tickvals is not None else _k_values(fig, axis_name)
            if ks:
                fig.update_layout({axis_name: {k: v for k, v in log2_k_axis(ks).items() if k != "title"}})
        elif _is_layer_axis(axis):
            fig.update_layout({axis_name: dict(tickmode="linear", dtick=1, tickformat="d")})
    return fig


def shared_scale(*arrays: Any) -> float:
    """One symmetric colour-scale bound for several heatmaps: max |value| over all of them (1 if none)."""
    import numpy as np

    bound = 0.0
    for a in arrays:
        values = np.asarray(a, dtype=float)
        if values.size and np.isfinite(values).any():
            bound = max(bound, float(np.nanmax(np.abs(values))))
    return bound or 1.0
