"""The report of a whole sweep (or of several runs side by side): one page over every cell.

    render_sweep("iclgd-store/", "sweep-report/")       # every done cell of a store
    render_sweep("grid.toml", "sweep-report/")          # the cells of a spec, from its store
    render_sweep_runs(["a/results.json", "b/results.json"], "both/")

The index holds Dai et al.'s table (tasks x models x metrics, ICL~GD beside its baselines, each
with its episode-level 95% interval; seeds pooled, since each seed draws its own episodes),
metric-vs-k curves per task and model (Shen et al.'s view), metric-vs-learning-rate and
-epochs curves where the GD settings form a grid, the layer profiles of the models side by
side, and a list of the cells, each linked to its own per-layer report (`render_report`) in
`cells/<key>/`. Every string from models, tasks and files is escaped; scripts come from assets/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from iclgd_lens import folders
from iclgd_lens.engine import stats
from iclgd_lens.engine.results import TABLE_COLUMNS, Results, versions
from iclgd_lens.errors import IclgdError
from iclgd_lens.report import (
    INDEX,
    check_report_target,
    figure_html,
    glossary,
    interval_text,
    render_report,
    style,
)
from iclgd_lens.report.assets import script_tags, write_assets
from iclgd_lens.report.figures import TEMPLATE, label
from iclgd_lens.report.templates import escape, page, section, table

AXIS_COLUMNS = ("task", "model", "gd", "k", "seed")
TABLE_METRICS = ("simaou", "simaou_norm", "simam_delta")
"""Similarities in Dai's table (layer-level, averaged over layers), each with its baselines."""
MODEL_METRICS = (("accuracy", "zsl"), ("accuracy", "icl"), ("accuracy", "gd"), ("rec2ftp", "icl~gd"))
BASELINES = ("icl~random", "icl~random_update", "untrained:icl~gd", "icl~icl_perm")
HEADLINE = "icl~gd"
PAGE_STAMP = ".drawn-by.json"
"""In a store cell's page folder: the versions that drew it. A later render of the same output
folder copies the page instead of drawing it again when they are unchanged (keys name content)."""
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass
class SweepCell:
    """One cell of the page: its key, its axis labels, and its Results or StudyResult."""

    key: str
    labels: dict
    results: Results | None = None
    study: Any = None
    stored: bool = False  # a store cell: its key names its content, so its page can be reused
    # the id of its configuration without the seed (`setting_id`): cells of one setting pool
    setting: str = ""


NOT_SETTINGS = ("seed", "run_time_s", "started")
"""Config entries that do not make another setting: the seed (seeds of one setting pool) and a
saved run's own timing."""


def setting_id(config: Any) -> str:
    """The id of a configuration without its seed and timing: cells that differ only in seed share
    it (and pool in the tables); any other difference (model file, n_queries, dtype, version) does not."""
    from iclgd_lens.sweep.identity import cell_key

    if not isinstance(config, dict):
        return ""
    return cell_key({k: v for k, v in config.items() if k not in NOT_SETTINGS})[:8]


# ---- sources ---------------------------------------------------------------------------------
def store_cells(source: str | os.PathLike, store: str | os.PathLike | None = None) -> list[SweepCell]:
    """The done cells of a store folder, or of a spec (a .toml file or preset) in its store."""
    from iclgd_lens.sweep.spec import load_spec
    from iclgd_lens.sweep.store import Store

    path = Path(source)
    if (path / "cells").is_dir() and store is None:
        the_store, keys = Store(path), None
    else:
        from iclgd_lens.sweep.run import plan

        spec = load_spec(source)
        the_store = Store(store or spec.store or "iclgd-store")
        keys = [p.key for p in plan(spec, the_store) if p.status == "done"]
    keys = the_store.done_keys() if keys is None else keys
    out = []
    for key in keys:
        info = the_store.cell_info(key)
        labels, setting = info.get("labels", {}), setting_id(info.get("config"))
        if info.get("kind") == "study":
            out.append(SweepCell(key, labels, study=the_store.load_study(key), stored=True, setting=setting))
        else:
            out.append(
                SweepCell(key, labels, results=the_store.load_results(key), stored=True, setting=setting)
            )
    if not out:
        raise IclgdError(f"no finished cells in {the_store.root} to draw (run the sweep first)")
    return told_apart(out)


def told_apart(cells: list[SweepCell]) -> list[SweepCell]:
    """`cells` with labels that no two different settings share. The tables pool the seeds of one
    (task, model, gd, k); where cells that read alike there belong to different settings (two
    specs written into one store: another model file, n_queries or version), each one's task label
    gets its setting's id ("default [3f2a9c1e]"), shared by that setting's seeds, so seeds pool
    and settings do not. Two cells of one setting and one seed (a run saved twice) get their keys."""
    groups: dict[tuple, list[SweepCell]] = {}
    for c in cells:
        groups.setdefault(tuple(str(c.labels.get(a)) for a in AXIS_COLUMNS if a != "seed"), []).append(c)
    for same in groups.values():
        settings = {c.setting for c in same}
        keys_of: dict[tuple, set] = {}
        for c in same:
            keys_of.setdefault((c.setting, str(c.labels.get("seed"))), set()).add(c.key)
        for c in same:
            if len(keys_of[(c.setting, str(c.labels.get("seed")))]) > 1:
                tag = c.key[:8]
            elif len(settings) > 1:
                tag = c.setting
            else:
                continue
            c.labels = {**c.labels, "task": f"{c.labels.get('task')} [{tag}]"}
    return cells


def run_cells(paths: Sequence[str | os.PathLike]) -> list[SweepCell]:
    """Saved runs (results.json / .parquet / report folders) as cells, labelled from their configs."""
    out = []
    for i, path in enumerate(paths):
        results = Results.load(path)
        config = results.config
        name = lambda v: str(v.get("name", "?")) if isinstance(v, dict) else str(v)  # noqa: E731
        gd = config.get("gd") or {}
        labels = {
            "model": name(config.get("model", "?")),
            "task": name(config.get("task", "?")),
            "k": config.get("k") if isinstance(config.get("k"), int) else -1,
            "gd": str(gd.get("name") or "custom") + (f" lr={gd['lr']:g}" if gd.get("lr") else ""),
            "seed": config.get("seed", 0),
            "run": str(path),
        }
        out.append(SweepCell(f"run{i:02d}", labels, results=results, setting=setting_id(config)))
    return told_apart(out)


# ---- the numbers -----------------------------------------------------------------------------
def combined_table(cells: Sequence[SweepCell]) -> pd.DataFrame:
    """Every compare cell's tidy table with the axis columns and `unit` = (seed, episode): the
    unit of every interval (episodes of different seeds are different draws)."""
    parts = []
    for c in cells:
        if c.results is None:
            continue
        t = c.results.table[[col for col in c.results.table.columns if col not in AXIS_COLUMNS or col == "k"]]
        t = t.assign(**{a: c.labels.get(a) for a in AXIS_COLUMNS if a != "k"}, cell=c.key)
        if "k" not in t.columns:
            t = t.assign(k=c.labels.get("k", -1))
        parts.append(t)
    if not parts:
        return pd.DataFrame(columns=list(TABLE_COLUMNS) + list(AXIS_COLUMNS) + ["cell", "unit"])
    table = pd.concat(parts, ignore_index=True)
    table["unit"] = table["seed"].astype(str) + ":" + table["episode"].astype(str)
    return table


def layer_averaged(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Episode-level mean and 95% interval per group: layer-level values (head -1, layer >= 0)
    averaged over layers and queries within each unit first; model-level ones (layer -1) as they are."""
    rows = table[table["head"] == -1]
    return stats.episode_summary(rows, list(by), episode="unit")


def dai_table(table: pd.DataFrame) -> pd.DataFrame:
    """Tasks x models (x GD setting) at each one's largest k: accuracy, Rec2FTP, and each
    similarity as ICL~GD [95% interval] beside the means of its baselines."""
    if table.empty:
        return pd.DataFrame()
    keys = ["task", "model", "gd"]
    largest = table.groupby(keys)["k"].transform("max")
    at_k = table[table["k"] == largest]
    summ = layer_averaged(at_k, keys + ["k", "metric", "comparison"])
    out = summ[keys + ["k"]].drop_duplicates().reset_index(drop=True)
    n_total = at_k.groupby(keys)["unit"].nunique()

    def column(metric: str, comparison: str, with_ci: bool) -> list:
        s = summ[(summ["metric"] == metric) & (summ["comparison"] == comparison)].set_index(keys + ["k"])
        values = []
        for row in out.itertuples(index=False):
            key = tuple(getattr(row, c) for c in keys + ["k"])
            if key not in s.index:
                values.append("")
                continue
            r = s.loc[key]
            text = "n/a" if pd.isna(r["mean"]) else f"{r['mean']:.3f}"
            if with_ci:
                text += interval_text(r["ci_low"], r["ci_high"], r["n_episodes"])
                total = int(n_total.loc[key[:-1]])
                if 0 < r["n_episodes"] < total:  # e.g. Rec2FTP, undefined where ICL fixes no query
                    text += f" ({int(r['n_episodes'])} of {total} episodes)"
            values.append(text)
        return values

    for metric, comparison in MODEL_METRICS:
        if ((summ["metric"] == metric) & (summ["comparison"] == comparison)).any():
            out[f"{metric} {comparison}"] = column(metric, comparison, metric == "rec2ftp")
    for metric in TABLE_METRICS:
        if not (summ["metric"] == metric).any():
            continue
        out[f"{metric} {HEADLINE}"] = column(metric, HEADLINE, True)
        for baseline in BASELINES:
            if ((summ["metric"] == metric) & (summ["comparison"] == baseline)).any():
                out[f"{metric} {baseline}"] = column(metric, baseline, False)
    n_units = at_k.groupby(keys)["unit"].nunique().rename("episodes").reset_index()
    return out.merge(n_units, on=keys, how="left")


# ---- figures -------------------------------------------------------------------------------------
def _error_trace(x, s: pd.DataFrame, name: str, i: int | None, comparison: str = HEADLINE) -> go.Scatter:
    """A line drawn as its comparison is everywhere (`style`: ICL~GD solid and strong, a floor
    dashed), with its 95% intervals as error bars. With several models / GD settings in one figure
    `i` gives each its own colour (the comparison still shows in dash, width and marker); with
    `i` None the line takes its comparison's own colour, as on every other page."""
    look = style.line(comparison)
    colour = look["color"] if i is None else _COLOURS[i % len(_COLOURS)]
    return go.Scatter(
        x=list(x),
        y=s["mean"].tolist(),
        error_y=dict(
            type="data",
            symmetric=False,
            array=(s["ci_high"] - s["mean"]).fillna(0).tolist(),
            arrayminus=(s["mean"] - s["ci_low"]).fillna(0).tolist(),
            thickness=1,
        ),
        mode="lines+markers",
        name=label(name),
        marker=dict(symbol=style.marker_symbol(comparison)),
        line=dict(color=colour, dash=look["dash"], width=look["width"]),
    )


def k_curves(table: pd.DataFrame, metric: str = "simaou") -> list[go.Figure]:
    """One figure per task: `metric` (ICL~GD, mean over layers) against k, a line per model and GD
    setting, 95% episode-level intervals as error bars; the random update of equal norm dashed."""
    figs = []
    for task, rows in table.groupby("task", sort=True):
        if rows["k"].nunique() < 2:
            continue
        summ = layer_averaged(rows[rows["metric"] == metric], ["model", "gd", "comparison", "k"])
        fig = go.Figure()
        groups = summ.groupby(["model", "gd"], sort=True)
        for i, ((model, gd), s) in enumerate(groups):
            for comparison in (HEADLINE, "icl~random_update"):
                part = s[s["comparison"] == comparison].sort_values("k")
                if not part.empty:
                    name = f"{model} · {gd} · {comparison}"
                    fig.add_trace(
                        _error_trace(part["k"], part, name, i if groups.ngroups > 1 else None, comparison)
                    )
        fig.update_layout(
            template=TEMPLATE,
            title=label(f"{metric} against k: task {task}"),
            height=380,
            xaxis=style.log2_k_axis(rows["k"].unique().tolist()),
            yaxis=dict(title=label(f"{metric} (mean over layers)")),
            margin=dict(l=60, r=20, t=50, b=50),
        )
        figs.append(fig)
    return figs


def gd_setting(cells: Sequence[SweepCell]) -> pd.DataFrame:
    """cell -> the GD learning rate and epochs it ran with, and its GD 'family' (the setting
    without lr and epochs), read from each cell's own config."""
    rows = []
    for c in cells:
        if c.results is None:
            continue
        gd = c.results.config.get("gd") or {}
        family = re.sub(r"\s*(lr|epochs)=\S+", "", str(c.labels.get("gd", ""))).strip()
        rows.append({"cell": c.key, "lr": gd.get("lr"), "epochs": gd.get("epochs"), "family": family})
    return pd.DataFrame(rows, columns=["cell", "lr", "epochs", "family"])


def grid_curves(table: pd.DataFrame, settings: pd.DataFrame, metric: str = "simaou") -> list[go.Figure]:
    """Where the GD settings form a grid: `metric` (ICL~GD) against the learning rate (log axis)
    and against epochs, one figure per task, a line per model, GD family, k (and the other knob)."""
    if table.empty or settings.empty:
        return []
    t = table[table["metric"] == metric].merge(settings, on="cell")
    figs = []
    for knob, other in (("lr", "epochs"), ("epochs", "lr")):
        for task, rows in t.groupby("task", sort=True):
            groups = ["model", "family", "k", other]
            if rows.groupby(groups)[knob].nunique().max() < 2:
                continue
            summ = layer_averaged(rows[rows["comparison"] == HEADLINE], groups + [knob])
            fig = go.Figure()
            for i, (key, s) in enumerate(summ.groupby(groups, sort=True)):
                if s[knob].nunique() < 2:
                    continue
                s = s.sort_values(knob)
                name = f"{key[0]} · {key[1]} · k={key[2]} · {other}={key[3]:g}"
                fig.add_trace(_error_trace(s[knob], s, name, i))
            fig.update_layout(
                template=TEMPLATE,
                title=label(f"{metric} ({HEADLINE}) against GD {knob}: task {task}"),
                height=380,
                xaxis=dict(title=knob, type="log" if knob == "lr" else "linear"),
                yaxis=dict(title=label(f"{metric} (mean over layers)")),
                margin=dict(l=60, r=20, t=50, b=50),
            )
            figs.append(fig)
    return figs


def layer_profiles(table: pd.DataFrame, metric: str = "simaou") -> list[go.Figure]:
    """One figure per task: a panel per model side by side, `metric` by layer at the largest k,
    a line per GD setting (ICL~GD solid, the random update of equal norm dashed)."""
    figs = []
    for task, rows in table.groupby("task", sort=True):
        rows = rows[(rows["metric"] == metric) & (rows["layer"] >= 0) & (rows["head"] == -1)]
        rows = rows[rows["k"] == rows["k"].max()] if not rows.empty else rows
        models = sorted(rows["model"].unique().tolist())
        if not models:
            continue
        fig = make_subplots(
            rows=1, cols=len(models), shared_yaxes=True, subplot_titles=[label(m) for m in models]
        )
        gds = sorted(rows["gd"].unique().tolist())
        for col, model in enumerate(models, start=1):
            summ = stats.episode_summary(
                rows[rows["model"] == model], ["gd", "comparison", "layer"], episode="unit"
            )
            for i, gd in enumerate(gds):
                for comparison in (HEADLINE, "icl~random_update"):
                    s = summ[(summ["gd"] == gd) & (summ["comparison"] == comparison)].sort_values("layer")
                    if s.empty:
                        continue
                    trace = _error_trace(
                        s["layer"], s, f"{gd} · {comparison}", i if len(gds) > 1 else None, comparison
                    )
                    trace.showlegend = col == 1
                    trace.legendgroup = f"{gd}{comparison}"
                    fig.add_trace(trace, row=1, col=col)
            fig.update_xaxes(**style.layer_axis(rows["layer"].unique().tolist()), row=1, col=col)
        fig.update_layout(
            template=TEMPLATE,
            title=label(f"{metric} by layer, models side by side: task {task} (k = {int(rows['k'].max())})"),
            height=400,
            yaxis=dict(title=label(metric)),
            margin=dict(l=60, r=20, t=70, b=50),
        )
        figs.append(fig)
    return figs


# ---- the page ------------------------------------------------------------------------------------
def _cell_links(cells: Sequence[SweepCell]) -> str:
    """The cells as a table (axis labels escaped), each row linked to the cell's own report."""
    head = "".join(f"<th>{a}</th>" for a in AXIS_COLUMNS) + "<th>kind</th><th>report</th>"
    rows = []
    for c in cells:
        tds = "".join(f"<td>{escape(c.labels.get(a, ''))}</td>" for a in AXIS_COLUMNS)
        kind = "study" if c.study is not None else "compare"
        link = f'<a href="cells/{escape(c.key)}/{INDEX}">{escape(c.key)}</a>'
        rows.append(f"<tr>{tds}<td>{kind}</td><td>{link}</td></tr>")
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _index(cells: Sequence[SweepCell], title: str, note: str) -> str:
    table_all = combined_table(cells)
    parts = [f'<p class="note">{escape(note)}</p>']
    if not table_all.empty:
        parts.append(
            section(
                "Tasks x models (Dai et al.'s table)",
                _metric_links() + table(dai_table(table_all)),
                anchor="dai-table",
                intro="Each similarity is averaged over layers; ICL~GD shows its mean and 95% t-interval "
                "over episodes (seeds pooled: each seed draws its own episodes) beside the means of "
                "its baselines, at each row's largest k. Accuracy is over label words.",
            )
        )
        for title_text, figs, intro in (
            (
                "Against k (Shen et al.'s view)",
                k_curves(table_all),
                "ICL~GD solid, the random update of equal norm dashed.",
            ),
            ("Against the GD learning rate and epochs", grid_curves(table_all, gd_setting(cells)), ""),
            ("Layer profiles side by side", layer_profiles(table_all), "At each task's largest k."),
        ):
            if figs:
                parts.append(section(title_text, "\n".join(figure_html(f) for f in figs), intro=intro))
    parts.append(
        section("Cells", _cell_links(cells), anchor="cells", intro="Each links to its own per-layer report.")
    )
    return "\n".join(parts)


def _render_cell(cell: SweepCell, folder: Path) -> None:
    """The cell's own report, pointed at the sweep's one copy of the scripts (../../assets/)."""
    if cell.study is not None:
        empty = Results(pd.DataFrame(columns=list(TABLE_COLUMNS)), {"study": cell.study.name}, {})
        render_report(empty, folder, study_results=[cell.study], analyses={})
    else:
        render_report(cell.results, folder)
    own, shared = script_tags(single_file=False), script_tags(single_file=False, prefix="../../assets/")
    for html_file in folder.glob("*.html"):
        text = html_file.read_text(encoding="utf-8")
        html_file.write_text(text.replace(own, shared), encoding="utf-8")
    shutil.rmtree(folder / "assets", ignore_errors=True)


def _metric_links() -> str:
    """The table's metric ids, each linked to its glossary entry (definition on hover)."""
    ids = dict.fromkeys([*TABLE_METRICS, *(m for m, _ in MODEL_METRICS)])
    return '<p class="note">Metrics: ' + ", ".join(glossary.metric_link(m) for m in ids) + ".</p>\n"


def _write_glossary(cells: Sequence[SweepCell], folder: Path, title: str, scripts: str) -> None:
    """The sweep's glossary page (the same entries as every report's), its metrics first."""
    metrics = sorted({m for c in cells if c.results is not None for m in c.results.metrics})
    body = section(
        "Glossary",
        glossary.glossary_html(metrics),
        "glossary",
        "Every metric id: definition, range, which direction means GD-like, unit and paper.",
    )
    header = f'<h1>{escape(title)}: glossary</h1><div><a href="{INDEX}">index</a></div>'
    (folder / glossary.GLOSSARY_PAGE).write_text(page(f"{title}: glossary", header, body, scripts), "utf-8")


def _write_pages(cells: Sequence[SweepCell], out: str | os.PathLike, title: str, note: str) -> Path:
    """Build the pages in a temporary folder beside `out` and move it into place when complete
    (an earlier sweep report is replaced then; a folder that is not a report is refused)."""
    out = Path(out)
    check_report_target(out)
    with folders.written_in_place(out, "report") as tmp:
        write_assets(tmp / "assets")
        stamp = json.dumps(versions(), sort_keys=True)
        for cell in cells:
            earlier = out / "cells" / cell.key
            if (
                cell.stored
                and (earlier / PAGE_STAMP).is_file()
                and (earlier / PAGE_STAMP).read_text() == stamp
            ):
                shutil.copytree(earlier, tmp / "cells" / cell.key)  # the same cell, drawn by the same code
                continue
            _render_cell(cell, tmp / "cells" / cell.key)
            if cell.stored:
                (tmp / "cells" / cell.key / PAGE_STAMP).write_text(stamp, encoding="utf-8")
        n = f"{len(cells)} cell{'' if len(cells) == 1 else 's'}"
        nav = f'<div><a href="{glossary.GLOSSARY_PAGE}">glossary</a></div>'
        header = f"<h1>{escape(title)}</h1><div>{n}</div>{nav}"
        body = _index(cells, title, note)
        scripts = script_tags(single_file=False)
        (tmp / INDEX).write_text(page(title, header, body, scripts), encoding="utf-8")
        _write_glossary(cells, tmp, title, scripts)
    return out / INDEX


def render_sweep(
    source: str | os.PathLike, out: str | os.PathLike, *, store: str | os.PathLike | None = None
) -> Path:
    """The sweep report of a store folder (every done cell) or a spec (its done cells, from
    `store` or the spec's own); returns the path of its index.html."""
    cells = store_cells(source, store)
    finished = f"{len(cells)} finished cell{'' if len(cells) == 1 else 's'}"
    intro = f"{finished} from {source}." + undrawn_note(source, store)
    return _write_pages(cells, out, "iclgd-lens sweep", intro)


def undrawn_note(source: str | os.PathLike, store: str | os.PathLike | None = None) -> str:
    """What the sweep report leaves out, said on its page: the cells that failed or are damaged
    (and, for a spec, those not computed yet); "" when nothing is left out."""
    from iclgd_lens.sweep.store import Store

    path = Path(source)
    counts: dict[str, int] = {}
    if (path / "cells").is_dir() and store is None:
        the_store = Store(path)
        keys = {f.stem for f in (path / "failed").glob("*.json")} | {
            p.name for p in (path / "cells").iterdir() if p.is_dir()
        }
        for key in keys:
            status = the_store.status(key)
            counts[status] = counts.get(status, 0) + 1
    else:
        from iclgd_lens.sweep.run import plan
        from iclgd_lens.sweep.spec import load_spec

        spec = load_spec(source)
        for planned in plan(spec, Store(store or spec.store or "iclgd-store")):
            counts[planned.status] = counts.get(planned.status, 0) + 1
    left = [f"{counts[s]} {s}" for s in ("failed", "damaged", "missing") if counts.get(s)]
    if not left:
        return ""
    return (
        f" Not drawn: {', '.join(left)} cell(s) (`iclgd-lens sweep SPEC --status` lists them, with the"
        " failures' errors; rerunning the sweep computes them again)."
    )


def render_sweep_runs(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Several saved runs drawn together, as the cells of one sweep."""
    cells = run_cells(paths)
    return _write_pages(
        cells, out, "iclgd-lens runs side by side", f"{len(cells)} runs: " + ", ".join(map(str, paths))
    )
