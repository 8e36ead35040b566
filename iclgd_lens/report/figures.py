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
from plotly.subplots import make_subplots

from iclgd_lens.engine.results import Results
from iclgd_lens.errors import IclgdError
from iclgd_lens.report import style

TEMPLATE = style.TEMPLATE
HEADLINE = style.HEADLINE


def comparison_order(comparisons: Sequence[str]) -> list[str]:
    """The headline comparison first, then the ceiling, the floors and the rest (`style.order`)."""
    return style.order(comparisons)


def label(text: Any) -> str:
    """A string plotly shows literally (it would otherwise read `<b>`, `<br>`... as markup)."""
    return html.escape(str(text), quote=False)


def _band_traces(x: Sequence, mean: Sequence, low: Sequence, high: Sequence, name: str) -> list[go.Scatter]:
    """A line with markers and a shaded 95% confidence band around it (`low`, `high` as given),
    in the comparison's colour and dash (`style.line`)."""
    x, low, high = list(x), list(low), list(high)
    has_band = any(not (isinstance(v, float) and math.isnan(v)) for v in low)
    traces = []
    if has_band:
        traces.append(
            go.Scatter(
                x=x + x[::-1],
                y=high + low[::-1],
                fill="toself",
                fillcolor=style.colour(name, 0.15 if name == HEADLINE else 0.08),
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
            line=style.line(name),
            marker=dict(color=style.colour(name), symbol=style.marker_symbol(name), size=7),
            customdata=np.stack([low, high], axis=-1) if x else None,
            hovertemplate="%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra>"
            + label(name)
            + "</extra>",
        )
    )
    return traces


def check_asked(
    results: Results, metric: str | None = None, layer: int | None = None, comparison: str | None = None
) -> None:
    """A metric, layer or comparison that the results do not have is a typo, not "nothing to
    draw": say so in one line, with what the results do have (a builder's None means only that
    what was asked for exists but has nothing to draw, e.g. a model-level metric over layers)."""
    t = results.table
    if metric is not None and metric not in results.metrics:
        raise IclgdError(f"no metric {metric!r} in the results; metrics: {', '.join(results.metrics)}")
    layers = sorted(t.loc[t["layer"] >= 0, "layer"].unique().tolist())
    if layer is not None and layer not in layers:
        raise IclgdError(f"no layer {layer!r} in the results; layers: {', '.join(map(str, layers))}")
    comparisons = [str(c) for c in pd.unique(t["comparison"])]  # in order of first appearance
    if comparison is not None and comparison not in comparisons:
        raise IclgdError(
            f"no comparison {comparison!r} in the results; comparisons: {', '.join(comparisons)}"
        )


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


def _layer_summary(results: Results, metric: str) -> pd.DataFrame:
    """Episode-level mean and 95% interval of `metric` per (comparison, layer), at the largest k."""
    t = results.table
    rows = _max_k(results, t[(t["metric"] == metric) & (t["layer"] >= 0) & (t["head"] == -1)])
    if rows.empty:
        return pd.DataFrame()
    return Results(rows, {}, {}).summary(by=("comparison", "layer"), p_values=False)


def layer_curve_figure(results: Results, metric: str) -> go.Figure | None:
    """`metric` over layers, one trace per comparison (headline + baselines), 95% bands: the
    episode-level t-intervals of `Results.summary` (over episode means, not pooled queries)."""
    check_asked(results, metric=metric)
    summ = _layer_summary(results, metric)
    if summ.empty:
        return None
    fig = go.Figure()
    for comparison in comparison_order(summ["comparison"].unique().tolist()):
        s = summ[summ["comparison"] == comparison].sort_values("layer")
        for trace in _band_traces(s["layer"], s["mean"], s["ci_low"], s["ci_high"], comparison):
            fig.add_trace(trace)
    _mark_undefined(fig, summ)
    k_note = f" (k = {max(results.k_values)})" if len(results.k_values) > 1 else ""
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"{metric} by layer{k_note}"),
        height=360,
        xaxis=style.layer_axis(summ["layer"]),
        yaxis=dict(title=label(metric)),
        legend=dict(title="comparison"),
    )
    return fig


def _mark_undefined(
    fig: go.Figure, summ: pd.DataFrame, row: int | None = None, col: int | None = None
) -> None:
    """Write "undefined" at each layer where the headline has no defined value (a gap is never silent)."""
    head = summ[(summ["comparison"] == HEADLINE) & summ["mean"].isna()]
    for layer in sorted(head["layer"].unique()):
        fig.add_annotation(
            x=int(layer),
            y=0.04,
            yref="y domain",
            text="undefined",
            hovertext="no defined value here: see the index's 'Undefined values' and the glossary",
            showarrow=False,
            font=dict(color="#888", size=11),
            row=row,
            col=col,
        )


def head_gaps(
    results: Results, layer: int, comparison: str = HEADLINE, grid: Grid | None = None
) -> list[str]:
    """Why cells of the per-head heatmap read n/a: one sentence per metric with missing heads.
    `grid`: the comparison's `head_grid` when the caller has it already."""
    from iclgd_lens.engine.metrics import UNDEFINED_BECAUSE

    grid, _ = grid if grid is not None else head_grid(results, layer, comparison)
    notes = []
    for metric, values in grid.iterrows():
        missing = [int(h) for h, v in values.items() if v != v]
        if not missing:
            continue
        heads = ", ".join(map(str, missing))
        if str(metric).startswith(("dw_", "dual_form")) and str(metric) != "dual_form_cos":
            why = (
                "it has one value per key/value head (column h is key/value head h, which query heads "
                "h*G to h*G+G-1 share, G = heads per key/value head), and this model has fewer key/value "
                "heads than heads"
            )
        else:
            why = UNDEFINED_BECAUSE.get(str(metric), "no defined value was recorded")
        notes.append(f"{metric} ({comparison}) at head(s) {heads}: {why}.")
    return notes


def layer_panels_figure(results: Results, metrics: Sequence[str], columns: int = 3) -> go.Figure | None:
    """Small multiples: one panel per metric over layers, all on shared axes (the same layers,
    the same y range), the same colour per comparison in every panel, one legend."""
    summaries = {m: s for m in metrics if not (s := _layer_summary(results, m)).empty}
    if not summaries:
        return None
    n = len(summaries)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        shared_xaxes="all",
        shared_yaxes="all",
        subplot_titles=[label(m) for m in summaries],
        horizontal_spacing=0.04,
        vertical_spacing=0.12 / max(rows - 1, 1) if rows > 1 else 0.0,
    )
    shown: set[str] = set()
    lows, highs, layers = [], [], set()
    for i, (metric, summ) in enumerate(summaries.items()):
        for comparison in comparison_order(summ["comparison"].unique().tolist()):
            s = summ[summ["comparison"] == comparison].sort_values("layer")
            layers.update(int(l) for l in s["layer"])
            cosine_like = (glossary_range(metric) or "") == "[-1, 1]"  # bands past +-1 say nothing
            lows += [
                max(v, -1.0) if cosine_like else v
                for v in s["ci_low"].tolist() + s["mean"].tolist()
                if v == v
            ]
            highs += [
                min(v, 1.0) if cosine_like else v
                for v in s["ci_high"].tolist() + s["mean"].tolist()
                if v == v
            ]
            if comparison == HEADLINE:
                _mark_undefined(fig, summ, row=i // cols + 1, col=i % cols + 1)
            for trace in _band_traces(s["layer"], s["mean"], s["ci_low"], s["ci_high"], comparison):
                if trace.fill is None:
                    trace.showlegend = comparison not in shown
                    shown.add(comparison)
                    trace.hovertemplate = label(metric) + " " + trace.hovertemplate
                fig.add_trace(trace, row=i // cols + 1, col=i % cols + 1)
    lo, hi = (min(lows), max(highs)) if lows else (-1.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    k_note = f", k = {max(results.k_values)}" if len(results.k_values) > 1 else ""
    fig.update_xaxes(
        showticklabels=True, **{k: v for k, v in style.layer_axis(layers).items() if k != "title"}
    )
    for i in range(n):  # the layer title under the lowest panel of each column
        if i + cols >= n:
            fig.update_xaxes(title_text="layer", row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_layout(
        template=TEMPLATE,
        title=label(
            f"The similarities side by side, on shared axes (mean and 95% interval over episodes{k_note})"
        ),
        height=90 + 250 * rows,
        legend=dict(title="comparison"),
    )
    return fig


def glossary_range(metric: str) -> str | None:
    """The value range the glossary gives for `metric` ("[-1, 1]" for cosines and taus), if any."""
    from iclgd_lens.report.glossary import entry

    found = entry(metric)
    return found.range if found else None


def k_curve_figure(results: Results, metric: str) -> go.Figure | None:
    """`metric` as a function of k (mean over layers, episodes, queries), one trace per comparison,
    on a log-2 k axis with every k labelled."""
    check_asked(results, metric=metric)
    if len(results.k_values) < 2:
        return None
    t = results.table
    rows = t[(t["metric"] == metric) & (t["head"] == -1)]
    if rows.empty:
        return None
    summ = Results(rows, {}, {}).summary(by=("comparison", "k"), p_values=False)
    fig = go.Figure()
    for comparison in comparison_order(summ["comparison"].unique().tolist()):
        s = summ[summ["comparison"] == comparison].sort_values("k")
        for trace in _band_traces(s["k"], s["mean"], s["ci_low"], s["ci_high"], comparison):
            fig.add_trace(trace)
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"{metric} as a function of k"),
        height=340,
        xaxis=style.log2_k_axis(results.k_values),
        yaxis=dict(title=label(metric)),
    )
    return fig


Grid = tuple[pd.DataFrame, pd.DataFrame]
"""Per-head means of one layer and comparison (metric x head) and their counts."""


def head_grids(results: Results, layer: int) -> dict[str, Grid]:
    """`head_grid` of every comparison with per-head rows at `layer`, from one summary (a layer
    page draws several comparisons' heatmaps and their gaps from the same numbers)."""
    check_asked(results, layer=layer)
    t = _max_k(results, results.table)
    rows = t[(t["layer"] == layer) & (t["head"] >= 0)]
    if rows.empty:
        return {}
    summ = Results(rows, {}, {}).summary(by=("comparison", "metric", "head"), p_values=False)
    return {
        comparison: (
            s.pivot(index="metric", columns="head", values="mean"),
            s.pivot(index="metric", columns="head", values="n"),
        )
        for comparison, s in summ.groupby("comparison", sort=False)
    }


def head_grid(results: Results, layer: int, comparison: str = HEADLINE) -> Grid:
    """Per-head means of one layer and comparison (metric x head) and their counts."""
    check_asked(results, layer=layer, comparison=comparison)
    return head_grids(results, layer).get(comparison, (pd.DataFrame(), pd.DataFrame()))


def head_heatmap_figure(
    results: Results,
    layer: int,
    comparison: str = HEADLINE,
    zmax: float | None = None,
    grid: Grid | None = None,
) -> go.Figure | None:
    """Per-head similarities of one layer: metric x head heatmap of means (one comparison), each
    cell labelled with its value. `zmax`: the symmetric colour bound, shared by the heatmaps of a
    page (`style.shared_scale`) so that one colour means one value on all of them. `grid`: the
    comparison's `head_grid` when the caller has it already."""
    grid, counts = grid if grid is not None else head_grid(results, layer, comparison)
    if grid.empty:
        return None
    z = grid.to_numpy(dtype=float)
    bound = zmax if zmax is not None else style.shared_scale(z)
    xs, ys = [f"head {h}" for h in grid.columns], [label(m) for m in grid.index]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=xs,
            y=ys,
            customdata=counts.to_numpy(),
            colorscale=style.DIVERGING,
            zmin=-bound,
            zmax=bound,
            texttemplate="%{z:.2f}",
            textfont=dict(size=11),
            hovertemplate="%{y}, %{x}: %{z:.3f} (n=%{customdata})<extra></extra>",
            hoverongaps=False,
            colorbar=dict(title="mean", thickness=12),
        )
    )
    rows, cols = np.nonzero(np.isnan(z))
    if len(rows):  # a cell without a value says so (the page's note says why)
        fig.add_trace(
            go.Scatter(
                x=[xs[c] for c in cols],
                y=[ys[r] for r in rows],
                mode="text",
                text=["n/a"] * len(rows),
                textfont=dict(color="#999", size=11),
                hovertemplate="%{y}, %{x}: no value (see the note below)<extra></extra>",
                showlegend=False,
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"layer {layer}: per-head means, {comparison} (n/a: no value, the note below says why)"),
        height=max(230, 150 + 34 * len(grid.index)),
        xaxis=dict(title="head", showline=False),
        yaxis=dict(showline=False, autorange="reversed"),
        margin=dict(l=170),
    )
    return fig


def dw_figure(dw_layer: dict, layer: int) -> go.Figure | None:
    """dW_ICL and dW_GD side by side, one row per kv head, with their cosine in each row title.

    `dw_layer = {"icl": [kv_head][d_head][d_head], "gd": [...], "cos": [kv_head]}` (episode 0;
    `example_artifacts`). The matrices may be rounded and pooled for drawing, so the cosine shown
    is the stored one, computed on the full matrices (`metrics.matrix_cosine`); None (NaN after
    a JSON round trip) shows as n/a, and results saved without "cos" show none. dW = sum of
    v k^T: rows index the value dimensions, columns the key dimensions. Each panel has its own
    symmetric colour scale and colour bar (GD's update is often far smaller than ICL's).
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
        horizontal_spacing=0.16,
        vertical_spacing=min(0.12, 0.45 / max(n_kv, 1)),
    )
    for h in range(n_kv):
        for col, (name, mat) in enumerate((("ICL", icl[h]), ("GD", gd[h])), start=1):
            scale = style.shared_scale(mat)
            axis_suffix = "" if (h == 0 and col == 1) else str(2 * h + col)
            x_domain = fig.layout[f"xaxis{axis_suffix}"].domain
            y_domain = fig.layout[f"yaxis{axis_suffix}"].domain
            fig.add_trace(
                go.Heatmap(
                    z=mat,
                    zmin=-scale,
                    zmax=scale,
                    colorscale=style.DIVERGING,
                    colorbar=dict(
                        title=dict(text=f"dW_{name}", side="right"),
                        x=x_domain[1] + 0.01,
                        xanchor="left",
                        y=(y_domain[0] + y_domain[1]) / 2,
                        len=(y_domain[1] - y_domain[0]),
                        thickness=10,
                        exponentformat="e",
                    ),
                    hovertemplate=f"dW_{name} kv head {h}: value dim %{{y}}, key dim %{{x}} = %{{z:.3g}}"
                    "<extra></extra>",
                ),
                row=h + 1,
                col=col,
            )
            fig.update_yaxes(autorange="reversed", title_text="value dim", row=h + 1, col=col)
            fig.update_xaxes(title_text="key dim", row=h + 1, col=col)
    fig.update_layout(
        template=TEMPLATE,
        title=f"layer {layer}: implicit weight updates (dW = sum of v k^T; each panel on its own scale)",
        height=130 + 320 * n_kv,
        margin=dict(t=90),
    )
    return fig


def query_distribution_figure(results: Results, layer: int, metric: str = "simaou") -> go.Figure | None:
    """Per-query values of `metric` in one layer, one box per comparison (headline vs baselines)."""
    check_asked(results, metric=metric, layer=layer)
    t = _max_k(results, results.table)
    rows = t[(t["metric"] == metric) & (t["layer"] == layer) & (t["head"] == -1) & (t["query"] >= 0)]
    if rows.empty:
        return None
    fig = go.Figure()
    for comparison in comparison_order(rows["comparison"].unique().tolist()):
        values = rows.loc[rows["comparison"] == comparison, "value"].dropna()
        fig.add_trace(
            go.Box(
                y=values,
                name=label(comparison),
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker=dict(color=style.colour(comparison), size=4),
                line=dict(color=style.colour(comparison)),
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=label(f"layer {layer}: per-query {metric} against its baselines"),
        height=360,
        yaxis=dict(title=label(metric)),
        showlegend=False,
    )
    return fig


def token_label(token: Any) -> str:
    """A token as a plotly label: whitespace visible (repr), markup escaped."""
    return label(repr(str(token))[1:-1])


def top_tokens_figure(
    top_tokens: Sequence[dict], title: str = "tokens whose probability ICL and GD move most"
) -> go.Figure | None:
    """Change of each token's probability under ICL and under GD (vs ZSL), side by side: two
    panels sharing the token axis and the probability scale, ICL in its colour, GD in its."""
    if not top_tokens:
        return None
    tokens = [token_label(row.get("token", "")) for row in top_tokens]
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):  # plotly merges equal categories: keep them apart
        seen[tok] = seen.get(tok, 0) + 1
        if seen[tok] > 1:
            tokens[i] = f"{tok} ({seen[tok]})"
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        subplot_titles=["ICL: p(token | ICL) - p(token | ZSL)", "GD: p(token | GD) - p(token | ZSL)"],
        horizontal_spacing=0.05,
    )
    for col, (key, name, cond) in enumerate((("d_icl", "ICL - ZSL", "icl"), ("d_gd", "GD - ZSL", "gd")), 1):
        values = [float(row.get(key, math.nan)) for row in top_tokens]
        fig.add_trace(
            go.Bar(
                y=tokens,
                x=values,
                name=name,
                orientation="h",
                marker_color=style.colour(cond),
                text=[f"{v:+.3f}" for v in values],
                textposition="auto",
                hovertemplate="%{y}: %{x:+.4f}<extra>" + name + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(
            title_text="change in probability", zeroline=True, zerolinecolor="#888", row=1, col=col
        )
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
    fig.update_xaxes(matches="x", row=1, col=2)  # one probability scale for both panels
    fig.update_layout(
        template=TEMPLATE,
        title=label(title),
        showlegend=False,
        height=170 + 24 * len(tokens),
        margin=dict(l=150),
    )
    return fig


def study_figure(fig: go.Figure) -> go.Figure:
    """A study's (or sweep's) figure in the report's style: `style.restyle` on a copy."""
    return style.restyle(go.Figure(fig))
