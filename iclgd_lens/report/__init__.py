"""Results -> an interactive HTML report that opens from the file system, offline.

    render_report(results, "iclgd-report/")        # index.html + layer_00.html ... + assets/
    render_report(results, "out/", single_file=True)  # out/report.html, everything inlined once

The folder also gets `results.json` / `results.parquet`. plotly.js and the circuitsvis bundle
are written once into `assets/` (or inlined once). The report is built in a temporary folder
beside the target and moved into place only when complete; an existing report is replaced
only then, and a folder that is not a report is never overwritten.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go

from iclgd_lens import folders
from iclgd_lens.engine import stats
from iclgd_lens.engine import verdict as verdict_marks
from iclgd_lens.engine.results import Results, versions
from iclgd_lens.engine.verdict import SIMILARITY_METRICS
from iclgd_lens.errors import IclgdError
from iclgd_lens.report import figures, glossary, style
from iclgd_lens.report.assets import script_tags, write_assets
from iclgd_lens.report.attention import attention_patterns_html
from iclgd_lens.report.glossary import GLOSSARY_PAGE
from iclgd_lens.report.templates import config_block, error, escape, page, section, table

__all__ = ["render_report", "check_report_target", "figures"]

INDEX = "index.html"
SINGLE = "report.html"
CONDITIONS = ("zsl", "icl", "gd")
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
NOT_MEASURED = "not measured"
"""What a table cell says where the results hold no such number (not a gap, not a zero)."""
CLIPPED = "Intervals are clipped to the metric's range; this keeps their 95% coverage."
"""Said wherever the report explains its intervals (`stats.episode_summary` clips them)."""


# ---- small helpers ----------------------------------------------------------------------
def figure_html(fig: go.Figure) -> str:
    """A figure as an HTML fragment that uses the page's plotly.js (never a CDN)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, config=_PLOTLY_CONFIG)


def _cells(glossary_page: str) -> Callable[[str, Any], str | None]:
    """Table cells: a metric name linked to its glossary entry, a verdict mark coloured."""

    def cell(column: str, value: Any) -> str | None:
        if column == "metric" and isinstance(value, str):
            return glossary.metric_link(value, glossary_page)
        if isinstance(value, str) and value in _MARK_CLASS:
            return f'<span class="mark {_MARK_CLASS[value]}">{escape(value)}</span>'
        return None

    return cell


_MARK_CLASS = {
    verdict_marks.ABOVE: "mark-above",
    verdict_marks.UNDECIDED: "mark-undecided",
    verdict_marks.BELOW: "mark-below",
    verdict_marks.UNDEFINED: "mark-undefined",
    verdict_marks.NO_BASELINE: "mark-none",
    NOT_MEASURED: "mark-none",
}


def linkify(text: str, glossary_page: str) -> str:
    """`text` escaped, with every metric id in it linked to its glossary entry."""
    ids = sorted(glossary.METRICS, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w:])(" + "|".join(map(re.escape, ids)) + r")(?![\w])")
    parts, last = [], 0
    for match in pattern.finditer(text):
        parts.append(escape(text[last : match.start()]))
        parts.append(glossary.metric_link(match.group(1), glossary_page))
        last = match.end()
    parts.append(escape(text[last:]))
    return "".join(parts)


def _table(df: pd.DataFrame, glossary_page: str, blank: str = NOT_MEASURED) -> str:
    """A table with linked metric names and "not measured" in the cells the results lack."""
    return table(df, cell=_cells(glossary_page), blank=blank)


def _items_html(items: Iterable[Any], glossary_page: str = GLOSSARY_PAGE) -> str:
    """Figures (in the report's style), tables and text (what analyses and studies return) as HTML."""
    parts = []
    for item in items:
        if isinstance(item, go.Figure):
            parts.append(figure_html(figures.study_figure(item)))
        elif isinstance(item, pd.DataFrame):
            parts.append(_table(item, glossary_page, blank=""))
        elif isinstance(item, str):
            parts.append(f"<p>{escape(item)}</p>")
        else:
            parts.append(error(f"cannot show an object of type {type(item).__name__}"))
    return "\n".join(parts)


def _by_layer(mapping: Any, layer: int) -> Any:
    """mapping[layer], whether its keys are ints or (after JSON) strings."""
    if not isinstance(mapping, Mapping):
        return None
    return mapping.get(layer, mapping.get(str(layer)))


def _layers(results: Results) -> list[int]:
    """Layer indices present in the table or the artifacts (none for a study's empty table)."""
    layers = {int(v) for v in results.table["layer"].unique() if v >= 0}
    for key in results.artifacts.get("dw") or {}:
        layers.add(int(key))
    for per_layer in (results.artifacts.get("attention") or {}).values():
        layers.update(int(k) for k in (per_layer or {}))
    return sorted(layers)


def _legend_html() -> str:
    """The colour and dash of each comparison, as used by every figure (a line per comparison)."""
    items = []
    for name in (style.HEADLINE, style.CEILING, *style.FLOORS, "icl", "gd", "zsl"):
        colour, dash, width = style.STYLES[name]
        border = {"solid": "solid", "dot": "dotted"}.get(dash, "dashed")
        items.append(
            f'<span class="legend-swatch" style="border-top: {max(2, int(width))}px {border} {colour};">'
            "</span>"
            f"{escape({'icl': 'ICL', 'gd': 'GD', 'zsl': 'zero-shot'}.get(name, name))}"
        )
    return '<p class="note">Colours in every figure:' + "".join(items) + "</p>"


# ---- index --------------------------------------------------------------------------------
def interval_text(ci_low: float, ci_high: float, n_episodes: int) -> str:
    """A table cell's interval: " [low, high]"; " [no spread over n episodes]" where two or more
    episodes gave the same mean (a zero-width t-interval says the episodes agree, not that the
    mean is certain: docs/statistics.md); "" where there is none (one episode)."""
    if pd.isna(ci_low) or pd.isna(ci_high):
        return ""
    if ci_low == ci_high and n_episodes >= 2:
        return f" [no spread over {int(n_episodes)} episodes]"
    return f" [{ci_low:.3f}, {ci_high:.3f}]"


def verdict_table(results: Results) -> pd.DataFrame:
    """The verdict's marks as metric x layer (plus the mean share of the ICL~ICL ceiling)."""
    found = results.verdict()
    if found.table.empty:
        return pd.DataFrame()
    marks = found.table.pivot_table(index="metric", columns="layer", values="mark", aggfunc="first")
    marks.columns = [f"layer {l}" for l in marks.columns]
    order = {m: i for i, m in enumerate(SIMILARITY_METRICS)}
    marks = marks.sort_index(key=lambda idx: idx.map(lambda m: order.get(m, 99)))
    share = found.table.groupby("metric")["of_ceiling"].mean()
    has_ceiling = found.table.groupby("metric")["ceiling"].apply(lambda c: c.notna().any())
    marks["ICL~GD / ceiling (mean over layers)"] = [
        f"{share[m]:.0%}"
        if m in share and share[m] == share[m]
        else "ceiling not above 0"
        if has_ceiling.get(m, False)
        else "no ceiling"
        for m in marks.index
    ]
    return marks.reset_index()


def headline_table(
    results: Results, metrics: Sequence[str] = (*SIMILARITY_METRICS, "rec2ftp", "token_overlap")
) -> pd.DataFrame:
    """The headline numbers with their baselines beside them: per metric of `metrics` (layer-level
    ones averaged over layers within each episode first; model-level ones as they are), one column
    per comparison (or, for accuracy, per condition), cells "mean [95% interval over episodes]",
    and the metric's unit."""
    t = figures._max_k(results, results.table)
    t = t[t["head"] == -1]
    wanted = [m for m in metrics if m in set(t["metric"])]
    if not wanted:
        return pd.DataFrame()
    rows = t[t["metric"].isin(wanted)]
    per_episode = rows.groupby(["metric", "comparison", "episode"], as_index=False)["value"].mean()
    summ = stats.episode_summary(per_episode, ["metric", "comparison"])
    n_total = t["episode"].nunique()

    def cell(r) -> str:
        if r["n_episodes"] == 0 or r["mean"] != r["mean"]:
            return "undefined"
        ci = interval_text(r["ci_low"], r["ci_high"], r["n_episodes"])
        # e.g. Rec2FTP is undefined in an episode where ICL fixes no query: say how many it rests on
        some = f" ({r['n_episodes']} of {n_total} episodes)" if r["n_episodes"] < n_total else ""
        return f"{r['mean']:.3f}{ci}{some}"

    summ["cell"] = summ.apply(cell, axis=1)
    wide = summ.pivot(index="metric", columns="comparison", values="cell")
    wide = wide[figures.comparison_order(list(wide.columns))]
    wide = wide.reindex([m for m in wanted if m in wide.index])
    wide.insert(0, "unit", [glossary.unit(m) or "—" for m in wide.index])
    wide.columns.name = None
    return wide.reset_index()


def _index_body(
    results: Results,
    layer_link: Callable[[int], str],
    analyses: Mapping[str, Callable],
    study_results: Sequence[Any],
    glossary_page: str,
) -> str:
    gl = glossary_page
    found = results.verdict()
    marks = verdict_table(results)
    sections = [
        section(
            "Verdict: is ICL's update GD-like here?",
            f'<p class="verdict-text">{linkify(found.text, gl)}</p>'
            + (_table(marks, gl) if len(marks) else ""),
            "verdict",
            "Per similarity metric and layer: ICL~GD above every floor this run has for the metric (the "
            "paragraph names them), not distinguishable from them, or below one; paired sign-flip tests "
            "over episodes, Holm-corrected across each metric's layers (docs/statistics.md, 'The "
            "verdict'). The last column: ICL~GD as a share of the ICL~ICL ceiling (ICL under another "
            "demonstration order), at the layers where the ceiling is clearly above 0. Hover a metric "
            "name for its definition.",
        )
    ]
    head = headline_table(results)
    accuracy = headline_table(results, ("accuracy", "accuracy_vocab"))
    if not head.empty:
        k_note = f" at k = {max(results.k_values)}" if len(results.k_values) > 1 else ""
        sections.append(
            section(
                "Headline numbers, with their baselines",
                _table(head, gl) + (_table(accuracy, gl) if not accuracy.empty else ""),
                "headline",
                f"Mean [95% t-interval over episodes]{k_note}: similarities averaged over layers and queries "
                "within each episode first; accuracy per condition; rec2ftp in percent. icl~gd is the "
                f"headline, icl~icl_perm the ceiling, the others floors. {CLIPPED}",
            )
        )

    layer_metric_names = figures.layer_metrics(results)
    similarity = [m for m in layer_metric_names if not m.startswith("probe:")]
    panels = figures.layer_panels_figure(results, [m for m in SIMILARITY_METRICS if m in similarity])
    curves = "\n".join(figure_html(f) for m in similarity if (f := figures.layer_curve_figure(results, m)))
    if panels or curves:
        sections.append(
            section(
                "Layer-wise similarities",
                _legend_html()
                + (figure_html(panels) if panels else "")
                + (f"<details open><summary>each metric on its own scale</summary>{curves}</details>"),
                "layers",
                "One trace per comparison: icl~gd is the headline, icl~icl_perm the ceiling, the others "
                "floors. Bands: 95% t-intervals over episodes (each episode's queries averaged first; see "
                "docs/statistics.md).",
            )
        )

    tests = paired_tests_table(results)
    if not tests.empty:
        n = int(tests.attrs.get("n_episodes", 0))
        floor = stats.min_p_value(n)
        shown = _table(tests, gl)
        sections.append(
            section(
                "Paired tests: icl~gd against its baselines",
                shown
                if len(tests) <= 40
                else f"<details><summary>{len(tests)} rows</summary>{shown}</details>",
                "paired-tests",
                "Per layer: diff = mean over episodes of (icl~gd - baseline), "
                f"p = two-sided paired sign-flip permutation test over the {n} episodes (exact up to "
                f"{stats.EXACT_MAX_EPISODES}); the smallest p attainable with {n} episodes is {floor:.3g}. "
                "icl~icl_perm is a ceiling (ICL under another demo order), the others floors. These p-values "
                "are not corrected for the number of tests; the verdict above corrects them across each "
                f"metric's layers (Holm). '{NOT_MEASURED}': the results hold no such baseline.",
            )
        )

    undefined = results.undefined()
    if not undefined.empty:
        sections.append(
            section(
                "Undefined values",
                _table(undefined, gl, blank=""),
                "undefined",
                "Where a metric has no defined value it is left out of every mean and curve (shown as "
                "'undefined' or n/a), for the reason given; see docs/metrics.md.",
            )
        )

    wide = model_metrics_table(results)
    if not wide.empty:
        sections.append(
            section(
                "Accuracy and output-distribution metrics",
                _table(wide, gl),
                "model-metrics",
                "Accuracy per condition, Rec2FTP (percent), token overlap, overlap cosine, KL, JS (nats): "
                "mean [95% t-interval over episode means] (episodes, values); undefined: no defined value "
                "(see Undefined values); "
                f"'{NOT_MEASURED}': the metric is not computed for that comparison. {CLIPPED}",
            )
        )

    if len(results.k_values) > 1:
        k_figs = "\n".join(
            figure_html(f) for m in results.metrics if (f := figures.k_curve_figure(results, m))
        )
        sections.append(
            section(
                "Metrics as a function of k",
                k_figs,
                "k-sweep",
                "Layer metrics are averaged over layers as well. The k axis is log-2, every k labelled.",
            )
        )

    probes = [m for m in layer_metric_names if m.startswith("probe:")]
    for metric in probes:
        fig = figures.layer_curve_figure(results, metric)
        sections.append(
            section(
                f"Probe {metric[len('probe:') :]}",
                figure_html(fig) if fig else "",
                f"probe-{metric[6:]}",
                f"metric {metric}, compared across conditions like SimAOU.",
            )
        )

    for name, fn in analyses.items():
        try:
            inner = _items_html(fn(results), gl)
        except Exception as err:  # one broken analysis must not cost the whole report
            warnings.warn(f"analysis {name!r} failed: {type(err).__name__}: {err}", stacklevel=2)
            inner = error(f"analysis failed: {type(err).__name__}: {err}")
        sections.append(
            section(f"Analysis: {name}", inner or '<p class="note">(nothing to show)</p>', f"analysis-{name}")
        )

    sections += [study_section(study, gl) for study in study_results]

    links = " ".join(f'<a href="{layer_link(l)}">layer {l}</a>' for l in _layers(results))
    if links:
        sections.append(
            section(
                "Layers",
                f'<nav class="layers">{links}</nav>',
                "layer-links",
                "Per-head similarities, dW_ICL vs dW_GD, per-query distributions, attention views.",
            )
        )
    sections.append(_config_section(results))
    return "\n".join(sections)


def _config_section(results: Results) -> str:
    report_info = {"rendered": _dt.datetime.now().isoformat(timespec="seconds"), "versions": versions()}
    return section(
        "Configuration",
        config_block(results.config)
        + "<details><summary>report</summary>"
        + config_block(report_info)
        + "</details>",
        "config",
        "Settings, package versions, seed and run time.",
    )


def study_section(study: Any, glossary_page: str = GLOSSARY_PAGE) -> str:
    """One study as a section: its question, findings, figures (in the report's style), its table
    (first 200 rows) and configuration; parts it does not have are left out, never shown empty."""
    name = getattr(study, "name", "study")
    inner = f"<p><b>Question.</b> {escape(getattr(study, 'question', ''))}</p>"
    findings_text = getattr(study, "findings", "")
    if findings_text:
        inner += f'<p class="findings"><b>Findings.</b> {linkify(findings_text, glossary_page)}</p>'
    figs = getattr(study, "figures", []) or []
    if figs:
        inner += _legend_html() + _items_html(figs, glossary_page)
    study_table = getattr(study, "table", None)
    if isinstance(study_table, pd.DataFrame) and not study_table.empty:
        shown = study_table.head(200)
        note = f'<p class="note">first 200 of {len(study_table)} rows</p>' if len(study_table) > 200 else ""
        shown_html = _table(shown, glossary_page, blank="")
        inner += f"<details><summary>table ({len(study_table)} rows)</summary>{note}{shown_html}</details>"
    if getattr(study, "config", None):
        inner += f"<details><summary>configuration</summary>{config_block(study.config)}</details>"
    return section(f"Study: {name}", inner, f"study-{name}")


def _study_body(results: Results, study_results: Sequence[Any], glossary_page: str) -> str:
    """A study's page: its sections only (a study's report has no comparison table, so no verdict,
    headline or layer sections), then the configuration."""
    parts = [study_section(study, glossary_page) for study in study_results]
    if results.config:
        parts.append(_config_section(results))
    return "\n".join(parts)


# ---- layer pages ---------------------------------------------------------------------------
def _layer_body(results: Results, layer: int, glossary_page: str = GLOSSARY_PAGE) -> str:
    gl = glossary_page
    t = results.table
    sections = []
    rows = t[(t["layer"] == layer) & (t["head"] == -1)]
    if not rows.empty:
        sections.append(
            section(
                "Numbers",
                _table(wide_summary(results, rows), gl),
                f"l{layer}-numbers",
                "mean [95% t-interval over episode means] (episodes, values), per metric and comparison; "
                "undefined: no defined value (see the index's 'Undefined values'); "
                f"'{NOT_MEASURED}': the metric is not computed for that comparison (e.g. dw_cos has no "
                f"random-vector baseline). {CLIPPED}",
            )
        )

    head_rows = t[(t["layer"] == layer) & (t["head"] >= 0)]
    comparisons = figures.comparison_order(head_rows["comparison"].unique().tolist())
    empty = (pd.DataFrame(), pd.DataFrame())
    grids = {c: empty for c in comparisons} | (figures.head_grids(results, layer) if len(head_rows) else {})
    bound = style.shared_scale(*[g.to_numpy(dtype=float) for g, _ in grids.values() if not g.empty])
    heat = [figures.head_heatmap_figure(results, layer, c, zmax=bound, grid=grids[c]) for c in comparisons]
    gaps: dict[str, list[str]] = {}  # one line per reason, naming the comparisons it applies to
    for c in comparisons:
        for note in figures.head_gaps(results, layer, c, grid=grids[c]):
            gaps.setdefault(note.replace(f" ({c})", ""), []).append(c)
    gaps_html = (
        '<p class="note">Cells marked n/a:</p><ul class="note">'
        + "".join(f"<li>{linkify(n, gl)} ({escape(', '.join(cs))})</li>" for n, cs in gaps.items())
        + "</ul>"
        if gaps
        else ""
    )
    sections.append(
        section(
            "Per-head similarities",
            ("\n".join(figure_html(f) for f in heat if f) + gaps_html)
            or '<p class="note">(no per-head values)</p>',
            f"l{layer}-heads",
            f"Mean per head and metric, value in each cell; every heatmap on this page shares one colour "
            f"scale (-{bound:.2f} to {bound:.2f}), so one colour is one value on all of them.",
        )
    )

    dw = figures.dw_figure(_by_layer(results.artifacts.get("dw"), layer), layer)
    sections.append(
        section(
            "Implicit weight updates: dW_ICL and dW_GD",
            figure_html(dw) if dw else '<p class="note">(no dW artifacts for this layer)</p>',
            f"l{layer}-dw",
            "Per kv head, episode 0 and its first query (dW_GD is the change over that query's context, "
            "so it differs from query to query): dW = sum of v k^T (rows: value dimensions, columns: "
            "key dimensions). "
            "The cosine in each title is computed from the full matrices.",
        )
    )

    dists = [
        figures.query_distribution_figure(results, layer, m)
        for m in ("simaou", "simaou_norm")
        if m in results.metrics
    ]
    sections.append(
        section(
            "Per-query SimAOU against its baselines",
            "\n".join(figure_html(f) for f in dists if f) or '<p class="note">(no per-query SimAOU)</p>',
            f"l{layer}-dist",
        )
    )

    views = []
    attention = results.artifacts.get("attention") or {}
    for condition in CONDITIONS:
        entry = _by_layer(attention.get(condition), layer)
        if entry and entry.get("tokens") is not None and entry.get("pattern") is not None:
            views.append(
                f'<h3 style="color: {style.colour(condition)}">{escape(condition.upper())}</h3>'
                + attention_patterns_html(entry["tokens"], entry["pattern"])
            )
    example = results.artifacts.get("example")
    if views and isinstance(example, Mapping):
        views.insert(
            0,
            "".join(
                f'<p><b>{escape(key)}</b></p><pre class="config">{escape(value)}</pre>'
                for key, value in example.items()
            ),
        )
    sections.append(
        section(
            "Attention on the example prompt",
            "\n".join(views) or '<p class="note">(no attention artifacts for this layer)</p>',
            f"l{layer}-attention",
            "circuitsvis views of ZSL, ICL and GD: pick a head, the zoomed pattern shows every token "
            "(decoded text; special tokens such as BOS by name; spaces as ·, newlines as ⏎); hover a token "
            "to see where it attends.",
        )
    )

    top = results.artifacts.get("top_tokens")
    top = _by_layer(top, layer) if isinstance(top, Mapping) else top
    fig = figures.top_tokens_figure(top or [])
    sections.append(
        section(
            "Tokens whose probabilities ICL and GD move most",
            figure_html(fig) if fig else '<p class="note">(no top-token artifacts)</p>',
            f"l{layer}-tokens",
            "The same tokens side by side: the change of each token's next-token probability under ICL "
            "(left) and under GD (right), both against zero-shot, on one scale.",
        )
    )
    return "\n".join(sections)


def layer_filename(layer: int) -> str:
    return f"layer_{layer:02d}.html"


# ---- writing ---------------------------------------------------------------------------------
def _name(value: Any) -> str:
    """A config entry as a short name: dicts (model info, task, GD config) by their `name`."""
    if isinstance(value, Mapping):
        return str(value.get("name") or value.get("model_name") or "?")
    return str(value)


def _header(results: Results, subtitle: str, links: str = "") -> str:
    cfg = results.config
    facts = ", ".join(
        f"{k}: {_name(cfg[k])}" for k in ("model", "task", "gd", "k", "seed", "study") if k in cfg
    )
    return f"<h1>iclgd-lens: {escape(subtitle)}</h1><div>{escape(facts)}</div>{links}"


def model_metrics_table(results: Results) -> pd.DataFrame:
    """Model-level metrics (layer == -1) as a wide table (see `wide_summary`)."""
    return wide_summary(results, results.table[results.table["layer"] == -1])


def wide_summary(results: Results, rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` of the table summarised as one row per metric (and k), one column per comparison,
    cells "mean [ci_low, ci_high] (n_episodes ep, n)" (episode-level intervals, `Results.summary`)."""
    if rows.empty:
        return pd.DataFrame()
    index = ["metric"] + (["k"] if len(results.k_values) > 1 else [])
    summ = Results(rows, {}, {}).summary(by=index + ["comparison"], p_values=False)

    def cell(r) -> str:
        if r["n"] == 0:
            return "undefined"
        ci = interval_text(r["ci_low"], r["ci_high"], r["n_episodes"])
        return f"{r['mean']:.3f}{ci} ({int(r['n_episodes'])} ep, {int(r['n'])})"

    summ["cell"] = summ.apply(cell, axis=1)
    wide = summ.pivot(index=index, columns="comparison", values="cell")
    wide = wide[figures.comparison_order(list(wide.columns))]
    wide.insert(0, "unit", [glossary.unit(i[0] if isinstance(i, tuple) else i) or "—" for i in wide.index])
    order = {m: i for i, m in enumerate(results.metrics)}
    wide = wide.reset_index().sort_values(by=index, key=lambda c: c.map(order) if c.name == "metric" else c)
    wide.columns.name = None
    return wide.reset_index(drop=True)


def paired_tests_table(results: Results, metrics: Sequence[str] = SIMILARITY_METRICS) -> pd.DataFrame:
    """icl~gd against each baseline, per layer, for the similarity `metrics` (layer-level rows,
    the largest k when the table sweeps k): one row per (metric, layer), one column per baseline
    present, cells "diff (p=...)" from `stats.paired_tests`. `attrs["n_episodes"]`: the most
    paired episodes of any test (what the smallest attainable p depends on)."""
    t = results.table
    rows = figures._max_k(results, t[t["metric"].isin(list(metrics)) & (t["layer"] >= 0) & (t["head"] == -1)])
    tests = stats.paired_tests(rows, ["metric", "layer"])
    if tests.empty:
        return pd.DataFrame()
    tests["cell"] = [f"{d:+.3f} (p={p:.3g})" for d, p in zip(tests["diff_mean"], tests["p_value"])]
    wide = tests.pivot(index=["metric", "layer"], columns="baseline", values="cell")
    wide = wide[
        [b for b in stats.BASELINES if b in wide.columns]
        + [b for b in wide.columns if b not in stats.BASELINES]
    ]
    wide = wide.rename(columns=lambda b: f"vs {b}")
    n = tests.groupby(["metric", "layer"])["n_episodes"].agg(["min", "max"])
    wide.insert(0, "episodes", [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in zip(n["min"], n["max"])])
    order = {m: i for i, m in enumerate(metrics)}
    wide = wide.reset_index().sort_values(
        ["metric", "layer"], key=lambda c: c.map(order) if c.name == "metric" else c
    )
    wide.columns.name = None
    wide = wide.reset_index(drop=True)
    wide.attrs["n_episodes"] = int(tests["n_episodes"].max())
    return wide


def _glossary_body(results: Results) -> str:
    return section(
        "Glossary",
        glossary.glossary_html(results.metrics),
        "glossary",
        "Every metric id: definition, range, which direction means GD-like, unit and paper "
        "(full definitions and deviations: docs/metrics.md).",
    )


def _write(
    results: Results,
    folder: Path,
    single_file: bool,
    analyses: Mapping[str, Callable],
    study_results: Sequence[Any],
) -> Path:
    results.save(folder)
    save_studies(study_results, folder)
    study_only = results.table.empty and bool(study_results)  # a study's report: its page only
    layers = [] if study_only else _layers(results)
    names = ", ".join(str(getattr(s, "name", "study")) for s in study_results)
    title, subtitle = (
        (f"iclgd-lens study {names}", f"study {names}")
        if study_only
        else ("iclgd-lens report", "ICL vs GD, layer by layer")
    )

    def index_body(layer_link: Callable[[int], str], gl: str) -> str:
        if study_only:
            return _study_body(results, study_results, gl)
        return _index_body(results, layer_link, analyses, study_results, gl)

    if single_file:
        body = index_body(lambda l: f"#layer-{l:02d}", "")
        for l in layers:
            body += f'\n<h1 id="layer-{l:02d}">Layer {l}</h1>\n' + _layer_body(results, l, "")
        body += "\n" + _glossary_body(results)
        target = folder / SINGLE
        header = _header(results, subtitle, '<div><a href="#glossary">glossary</a></div>')
        target.write_text(page(title, header, body, script_tags(single_file=True)), encoding="utf-8")
        return target

    write_assets(folder / "assets")
    scripts = script_tags(single_file=False)
    body = index_body(layer_filename, GLOSSARY_PAGE)
    nav = [f'<a href="{layer_filename(l)}">layer {l}</a>' for l in layers] + [
        f'<a href="{GLOSSARY_PAGE}">glossary</a>'
    ]
    header = _header(results, subtitle, "<div>" + " | ".join(nav) + "</div>")
    (folder / INDEX).write_text(page(title, header, body, scripts), encoding="utf-8")
    for i, l in enumerate(layers):
        nav = [f'<a href="{INDEX}">index</a>']
        if i > 0:
            nav.append(f'<a href="{layer_filename(layers[i - 1])}">&larr; layer {layers[i - 1]}</a>')
        if i + 1 < len(layers):
            nav.append(f'<a href="{layer_filename(layers[i + 1])}">layer {layers[i + 1]} &rarr;</a>')
        nav.append(f'<a href="{GLOSSARY_PAGE}">glossary</a>')
        header = _header(results, f"layer {l}", "<div>" + " | ".join(nav) + "</div>")
        (folder / layer_filename(l)).write_text(
            page(f"iclgd-lens layer {l}", header, _layer_body(results, l), scripts), encoding="utf-8"
        )
    header = _header(results, "glossary", f'<div><a href="{INDEX}">index</a></div>')
    (folder / GLOSSARY_PAGE).write_text(
        page("iclgd-lens glossary", header, _glossary_body(results), scripts), encoding="utf-8"
    )
    return folder / INDEX


STUDIES_DIR = "studies"
"""Where a report keeps its studies' saved results (`StudyResult.save`), one folder each."""


def save_studies(study_results: Sequence[Any], folder: Path) -> None:
    """Save every study of a report under `folder/studies/NN-name/`, so `render` rebuilds it."""
    for i, study in enumerate(study_results):
        if hasattr(study, "save"):
            safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(study.name))[:60]
            study.save(folder / STUDIES_DIR / f"{i:02d}-{safe}")


def load_studies(folder: Path) -> list[Any]:
    """The studies a report folder saved (`save_studies`), in their order; [] if none."""
    from iclgd_lens.study import STUDY_JSON, StudyResult

    return [StudyResult.load(p) for p in sorted((Path(folder) / STUDIES_DIR).glob(f"*/{STUDY_JSON}"))]


def _holds_report(folder: Path) -> bool:
    """Whether `folder` holds an earlier iclgd-lens report (which a new one may replace)."""
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


def check_report_target(out_dir: str | os.PathLike) -> None:
    """Fail in one line, before any work, where a report could not be written at `out_dir`
    (`folders.check_target`: never over what is not a report, never into an unwritable place)."""
    folders.check_target(out_dir, _holds_report, "report", whole=True)


def render_report(
    results: Results,
    out_dir: str | os.PathLike = "iclgd-report",
    *,
    single_file: bool = False,
    study_results: Sequence[Any] = (),
    analyses: Mapping[str, Callable] | None = None,
    csv_tables: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Write the report for `results` into `out_dir`; return the path of its index.html (report.html).

    `analyses`: name -> fn(results) rendered as sections (default: every registered analysis,
    see `iclgd_lens.analyses`). `study_results`: StudyResult objects, one section each.
    `csv_tables`: file name -> table, written as CSV files of the report folder (inside its
    swap, so they are in place exactly when the report is, and a later report replaces them).
    """
    if not isinstance(results, Results):
        raise IclgdError(f"render_report needs a Results, got {type(results).__name__}")
    if analyses is None:
        from iclgd_lens.plugins import load_entry_points

        analyses = dict(load_entry_points("analyses"))
    out = Path(out_dir)
    check_report_target(out)
    with folders.written_in_place(out, "report") as tmp:
        entry = _write(results, tmp, single_file, analyses, list(study_results))
        for file_name, table in (csv_tables or {}).items():
            table.to_csv(tmp / file_name, index=False)
    return out / entry.name
