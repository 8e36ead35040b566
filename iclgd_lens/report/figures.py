"""Plotly figure builders for the report; each also works inline in a notebook (`fig.show()`).

Every builder takes a `Results` (or one of its artifacts) and returns a `go.Figure`, or None
when the results hold nothing to draw. Token strings are HTML-escaped before they reach
plotly, which interprets a few tags in labels: a token is always shown as the text it is.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from iclgd_lens.engine.results import Results

TEMPLATE = "plotly_white"
HEADLINE = "icl~gd"
_PALETTE = qualitative.Plotly


def comparison_order(comparisons: Sequence[str]) -> list[str]:
    """The headline comparison first, then the others alphabetically (stable trace colours)."""
    rest = sorted(c for c in set(comparisons) if c != HEADLINE)
    return ([HEADLINE] if HEADLINE in comparisons else []) + rest


def _colour(i: int, alpha: float = 1.0) -> str:
    hex_colour = _PALETTE[i % len(_PALETTE)].lstrip("#")
    r, g, b = (int(hex_colour[j : j + 2], 16) for j in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def label(text: Any) -> str:
    """A string plotly shows literally (it would otherwise read `<b>`, `<br>`... as markup)."""
    return html.escape(str(text), quote=False)


def _band_traces(
    x: Sequence, mean: Sequence, low: Sequence, high: Sequence, name: str, i: int
) -> list[go.Scatter]:
    """A line with markers and a shaded 95% confidence band around it (`low`, `high` as given)."""
    x, low, high = list(x), list(low), list(high)
    has_band = any(not (isinstance(v, float) and math.isnan(v)) for v in low)
    traces = []
    if has_band:
        traces.append(
            go.Scatter(
                x=x + x[::-1],
                y=high + low[::-1],
                fill="toself",
                fillcolor=_colour(i, 0.18),
                mode="lines",
                line=dict(width=0),
                hoverinfo="skip",
                showlegend=False,
                legendgroup=name,
                name=f"{name} 95% CI",
            )
        )
    traces.append(
        go.Scatter(
            x=x,
            y=list(mean),
            mode="lines+markers",
            name=label(name),
            legendgroup=name,
            line=dict(color=_colour(i), width=2.5 if name == HEADLINE else 1.5),
            error_y=None,
            customdata=np.stack([low, high], axis=-1) if x else None,
            hovertemplate="%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra>"
            + label(name)
            + "</extra>",
        )
    )
    return traces


def _max_k(results: Results, table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the largest k when the table sweeps k (curves over layers are drawn at one k)."""
    if len(results.k_values) > 1:
        return table[table["k"] == max(results.k_values)]
    return table


def layer_metrics(results: Results) -> list[str]:
    """Metrics that have layer-level values (layer >= 0, head == -1)."""
    t = results.table
    return list(dict.fromkeys(t.loc[(t["layer"] >= 0) & (t["head"] == -1), "metric"]))


def model_metrics(results: Results) -> list[str]:
    """Metrics given once per model (layer == -1): accuracy, Rec2FTP, token overlap, KL, ..."""
    t = results.table
    return list(dict.fromkeys(t.loc[t["layer"] == -1, "metric"]))


def layer_curve_figure(results: Results, metric: str) -> go.Figure | None:
    """`metric` over layers, one trace per comparison (headline + baselines), 95% bands: the
    episode-level t-intervals of `Results.summary` (over episode means, not pooled queries)."""
    t = results.table
    rows = _max_k(results, t[(t["metric"] == metric) & (t["layer"] >= 0) & (t["head"] == -1)])
    if rows.empty:
        return None
    summ = Results(rows, {}, {}).summary(by=("comparison", "layer"), p_values=False)  # episode-level bands
    fig = go.Figure()
    for i, comparison in enumerate(comparison_order(summ["comparison"].unique().tolist())):
        s = summ[summ["comparison"] == comparison].sort_values("layer")
        for trace in _band_traces(s["layer"], s["mean"], s["ci_low"], s["ci_high"], comparison, i):
            fig.add_trace(trace)
    k_note = f" (k = {max(results.k_values)})" if len(results.k_values) > 1 else ""
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"{metric} by layer{k_note}"),
        height=360,
        xaxis=dict(title="layer", dtick=1),
        yaxis=dict(title=label(metric)),
        legend=dict(title="comparison"),
        margin=dict(l=60, r=20, t=50, b=50),
    )
    return fig


def k_curve_figure(results: Results, metric: str) -> go.Figure | None:
    """`metric` as a function of k (mean over layers, episodes, queries), one trace per comparison."""
    if len(results.k_values) < 2:
        return None
    t = results.table
    rows = t[(t["metric"] == metric) & (t["head"] == -1)]
    if rows.empty:
        return None
    summ = Results(rows, {}, {}).summary(by=("comparison", "k"), p_values=False)
    fig = go.Figure()
    for i, comparison in enumerate(comparison_order(summ["comparison"].unique().tolist())):
        s = summ[summ["comparison"] == comparison].sort_values("k")
        for trace in _band_traces(s["k"], s["mean"], s["ci_low"], s["ci_high"], comparison, i):
            fig.add_trace(trace)
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"{metric} as a function of k"),
        height=340,
        xaxis=dict(title="k (demonstrations)", type="log", tickvals=results.k_values),
        yaxis=dict(title=label(metric)),
        margin=dict(l=60, r=20, t=50, b=50),
    )
    return fig


def head_heatmap_figure(results: Results, layer: int, comparison: str = HEADLINE) -> go.Figure | None:
    """Per-head similarities of one layer: metric x head heatmap of means (one comparison)."""
    t = _max_k(results, results.table)
    rows = t[(t["layer"] == layer) & (t["head"] >= 0) & (t["comparison"] == comparison)]
    if rows.empty:
        return None
    summ = Results(rows, {}, {}).summary(by=("metric", "head"))
    grid = summ.pivot(index="metric", columns="head", values="mean")
    counts = summ.pivot(index="metric", columns="head", values="n")
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[f"head {h}" for h in grid.columns],
            y=[label(m) for m in grid.index],
            customdata=counts.to_numpy(),
            colorscale="RdBu",
            zmid=0,
            hovertemplate="%{y}, %{x}: %{z:.3f} (n=%{customdata})<extra></extra>",
            colorbar=dict(title="mean"),
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"layer {layer}: per-head similarities ({comparison})"),
        height=140 + 40 * len(grid.index),
        margin=dict(l=140, r=20, t=50, b=40),
    )
    return fig


def dw_figure(dw_layer: dict, layer: int) -> go.Figure | None:
    """dW_ICL and dW_GD side by side, one row per kv head, with their cosine in each row title.

    `dw_layer = {"icl": [kv_head][d_head][d_head], "gd": [...], "cos": [kv_head]}` (episode 0;
    `example_artifacts`). The matrices may be rounded and pooled for drawing, so the cosine shown
    is the stored one, computed on the full matrices (`metrics.matrix_cosine`); None (NaN after
    a JSON round trip) shows as n/a, and results saved without "cos" show none.
    """
    if not dw_layer or "icl" not in dw_layer or "gd" not in dw_layer:
        return None
    icl = np.asarray(dw_layer["icl"], dtype=float)  # [kv_heads, d_head, d_head]
    gd = np.asarray(dw_layer["gd"], dtype=float)
    if icl.ndim == 2:
        icl, gd = icl[None], gd[None]
    n_kv = icl.shape[0]
    stored = [] if dw_layer.get("cos") is None else list(dw_layer["cos"])  # [kv_head]
    titles = []
    for h in range(n_kv):
        if h >= len(stored):
            shown = ""
        elif stored[h] is None or math.isnan(stored[h]):
            shown = " (cos = n/a)"
        else:
            shown = f" (cos = {stored[h]:.3f})"
        titles += [f"kv head {h}: dW_ICL", f"kv head {h}: dW_GD{shown}"]
    fig = make_subplots(
        rows=n_kv,
        cols=2,
        subplot_titles=titles,
        horizontal_spacing=0.08,
        vertical_spacing=min(0.08, 0.3 / max(n_kv, 1)),
    )
    for h in range(n_kv):
        for col, (name, mat) in enumerate((("ICL", icl[h]), ("GD", gd[h])), start=1):
            scale = float(np.abs(mat).max()) or 1.0  # each matrix on its own symmetric scale
            fig.add_trace(
                go.Heatmap(
                    z=mat,
                    zmin=-scale,
                    zmax=scale,
                    zmid=0,
                    colorscale="RdBu",
                    showscale=False,
                    hovertemplate=f"dW_{name} kv {h}" + " [%{y}, %{x}] = %{z:.3g}<extra></extra>",
                ),
                row=h + 1,
                col=col,
            )
            fig.update_yaxes(autorange="reversed", row=h + 1, col=col)
    fig.update_layout(
        template=TEMPLATE,
        title=f"layer {layer}: implicit weight updates (each panel on its own colour scale)",
        height=120 + 300 * n_kv,
        margin=dict(l=40, r=20, t=80, b=30),
    )
    return fig


def query_distribution_figure(results: Results, layer: int, metric: str = "simaou") -> go.Figure | None:
    """Per-query values of `metric` in one layer, one box per comparison (headline vs baselines)."""
    t = _max_k(results, results.table)
    rows = t[(t["metric"] == metric) & (t["layer"] == layer) & (t["head"] == -1) & (t["query"] >= 0)]
    if rows.empty:
        return None
    fig = go.Figure()
    for i, comparison in enumerate(comparison_order(rows["comparison"].unique().tolist())):
        values = rows.loc[rows["comparison"] == comparison, "value"].dropna()
        fig.add_trace(
            go.Box(
                y=values,
                name=label(comparison),
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker=dict(color=_colour(i), size=4),
                line=dict(color=_colour(i)),
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"layer {layer}: per-query {metric} against its baselines"),
        height=360,
        yaxis=dict(title=label(metric)),
        showlegend=False,
        margin=dict(l=60, r=20, t=50, b=50),
    )
    return fig


def top_tokens_figure(
    top_tokens: Sequence[dict], title: str = "tokens whose probability ICL and GD move most"
) -> go.Figure | None:
    """Change of each token's probability under ICL and GD (vs ZSL), grouped bars."""
    if not top_tokens:
        return None
    tokens = [
        label(repr(str(row.get("token", "")))[1:-1]) for row in top_tokens
    ]  # repr shows spaces/newlines
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):  # plotly merges equal categories: keep them apart
        seen[tok] = seen.get(tok, 0) + 1
        if seen[tok] > 1:
            tokens[i] = f"{tok} ({seen[tok]})"
    fig = go.Figure()
    for i, (key, name) in enumerate((("d_icl", "ICL - ZSL"), ("d_gd", "GD - ZSL"))):
        fig.add_trace(
            go.Bar(
                y=tokens,
                x=[float(row.get(key, math.nan)) for row in top_tokens],
                name=name,
                orientation="h",
                marker_color=_colour(i),
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=label(title),
        barmode="group",
        height=160 + 22 * len(tokens),
        yaxis=dict(autorange="reversed", type="category"),
        xaxis=dict(title="change in probability"),
        margin=dict(l=160, r=20, t=50, b=50),
    )
    return fig
