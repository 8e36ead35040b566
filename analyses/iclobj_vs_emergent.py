"""Study: does ICL that emerged from ordinary pretraining look more (or less) like GD than ICL
trained with an explicit ICL objective?

The same comparison (`compare`: same task, episodes, GD setting, seed) runs on two models,
by default the embedded `tiny-llama-icl` (ICL emerged from next-token pretraining on a bursty
corpus) and `tiny-llama-iclobj` (trained with an explicit ICL objective). The tables are
stacked with a `model` column. Differences are tested per metric (layer-level metrics
averaged over layers per query, then per episode; a paired sign-flip test over episodes) and
per layer for SimAOU.
"""

from __future__ import annotations

import time
from typing import Sequence

import pandas as pd
import plotly.express as px

from iclgd_lens import GDConfig, IclgdError, StudyResult, Task, compare, resolve_task, stats, versions
from iclgd_lens.study import as_bridge, checked_args, layer_mean, model_name, queries_that_ran

QUESTION = (
    "Does ICL learned through an explicit ICL objective agree with GD differently from ICL "
    "that emerged in pretraining?"
)
DEFAULT_MODELS = ("tiny-llama-icl", "tiny-llama-iclobj")
COMPARED = (
    ("accuracy", "zsl"),
    ("accuracy", "icl"),
    ("accuracy", "gd"),
    ("simaou", "icl~gd"),
    ("simaou_norm", "icl~gd"),
    ("simam_delta", "icl~gd"),
    ("dw_cos", "icl~gd"),
    ("token_overlap", "icl~gd"),
    ("kl", "icl~gd"),
    ("simaou", "icl~icl_perm"),
)
"""(metric, comparison) pairs tested for a difference between the two models."""


@checked_args
def run(
    models: Sequence = DEFAULT_MODELS,
    task: Task | None = None,
    *,
    k: int = 8,
    gd: GDConfig | str = "dai",
    n_episodes: int = 4,
    n_queries: int = 16,
    baselines: Sequence[str] | bool = ("random", "random_update", "icl_perm"),
    alpha: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Compare ICL with GD on each of two models (names or bridges) and test the differences.

    Differences with paired p < `alpha` are reported as such in the findings and the table
    `differences` rows (metric `diff:<metric>`, comparison as in the engine).
    """
    started = time.time()
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if len(models) != 2:
        raise IclgdError(f"iclobj-vs-emergent compares exactly two models, got {len(models)}")
    bridges = [as_bridge(m) for m in models]
    names = [m if isinstance(m, str) else model_name(b) for m, b in zip(models, bridges)]
    if names[0] == names[1]:
        names = [f"{names[0]} (1)", f"{names[1]} (2)"]
    task = resolve_task(task, seed)
    frames = []
    for name, bridge in zip(names, bridges):
        if progress:
            print(f"[iclobj-vs-emergent] {name}", flush=True)
        res = compare(
            bridge,
            task,
            gd=gd,
            k=k,
            n_episodes=n_episodes,
            n_queries=n_queries,
            seed=seed,
            baselines=baselines,
            progress=progress,
            artifacts=False,
        )
        frames.append(res.table.assign(model=name))
    table = pd.concat(frames, ignore_index=True)
    diffs = differences(table, names)
    config = dict(
        models=names,
        task=task.name,
        k=k,
        gd=gd if isinstance(gd, str) else gd.__dict__,
        n_episodes=n_episodes,
        n_queries=queries_that_ran(table),
        n_queries_asked=n_queries,
        baselines=baselines,
        alpha=alpha,
        seed=seed,
        versions=versions(),
        run_time_s=round(time.time() - started, 2),
    )
    return StudyResult(
        "iclobj-vs-emergent", QUESTION, table, figures(table, diffs), findings(diffs, names, alpha), config
    )


def _per_query(table: pd.DataFrame, metric: str, comparison: str, layer: int | None = None) -> pd.Series:
    """One value per (model, episode, query): the mean over layers (or one layer)."""
    rows = table[(table.metric == metric) & (table.comparison == comparison) & (table["head"] == -1)]
    if layer is not None:
        rows = rows[rows.layer == layer]
    return rows.groupby(["model", "episode", "query"])["value"].mean()


def differences(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per (metric, comparison[, layer]): mean of each model, difference (second - first), and
    a paired sign-flip test over episodes (both models see the same episodes; the queries of
    one episode are not independent, so each episode is one pair of per-episode means)."""
    a, b = names
    keys = [(m, c, None) for m, c in COMPARED]
    layers = sorted(table.loc[(table.metric == "simaou") & (table.layer >= 0), "layer"].unique())
    keys += [("simaou", "icl~gd", int(l)) for l in layers]
    rows = []
    for metric, comparison, layer in keys:
        values = _per_query(table, metric, comparison, layer)
        if (
            values.empty
            or a not in values.index.get_level_values(0)
            or b not in values.index.get_level_values(0)
        ):
            continue
        per_episode = values.groupby(level=["model", "episode"]).mean()  # NaNs dropped within an episode
        ea, eb = per_episode.loc[a].dropna(), per_episode.loc[b].dropna()
        if len(ea) < 2 or len(eb) < 2:
            continue
        test = stats.paired_test(eb, ea)  # paired by episode
        rows.append(
            dict(
                metric=metric,
                comparison=comparison,
                layer=-1 if layer is None else layer,
                mean_a=float(ea.mean()),
                mean_b=float(eb.mean()),
                diff=test.diff_mean,
                p_value=test.p_value,
                n_episodes=test.n_episodes,
            )
        )
    return pd.DataFrame(
        rows, columns=["metric", "comparison", "layer", "mean_a", "mean_b", "diff", "p_value", "n_episodes"]
    )


def figures(table: pd.DataFrame, diffs: pd.DataFrame) -> list:
    """Per-layer SimAOU of both models with baselines; accuracy of ZSL/ICL/GD per model;
    the differences table."""
    rows = table[(table.metric == "simaou") & (table["head"] == -1) & (table.layer >= 0)]
    curve = rows.groupby(["model", "comparison", "layer"], as_index=False)["value"].mean()
    fig_layers = px.line(
        curve,
        x="layer",
        y="value",
        color="comparison",
        line_dash="model",
        markers=True,
        category_orders={
            "comparison": sorted(curve["comparison"].unique(), key=lambda c: (c != "icl~gd", c))
        },
        labels={"value": "SimAOU (raw)"},
        title="Per-layer SimAOU of both models (colour: comparison, dash: model)",
    )
    fig_layers.update_xaxes(dtick=1, tickformat="d")  # whole layers
    acc = layer_mean(table[table.metric == "accuracy"])
    acc = acc.assign(err_plus=acc.ci_high - acc["mean"], err_minus=acc["mean"] - acc.ci_low)
    fig_acc = px.bar(
        acc,
        x="comparison",
        y="mean",
        color="model",
        barmode="group",
        error_y="err_plus",
        error_y_minus="err_minus",
        range_y=[0, 1.05],
        labels={"mean": "accuracy (argmax over label words)", "comparison": "condition"},
        title="Accuracy of zero-shot, ICL and GD per model (95% CI)",
    )
    figs = [fig_layers, fig_acc]
    if not diffs.empty:
        import plotly.graph_objects as go

        shown = diffs.round(4)
        figs.append(
            go.Figure(
                go.Table(
                    header=dict(values=list(shown.columns)),
                    cells=dict(values=[shown[c] for c in shown.columns]),
                ),
                layout=dict(title="Differences between the models (paired sign-flip test over episodes)"),
            )
        )
    return figs


def findings(diffs: pd.DataFrame, names: list[str], alpha: float) -> str:
    """The significant differences, and the accuracies, in sentences computed from `diffs`."""
    if diffs.empty:
        return "No metric could be compared (too few queries)."
    a, b = names
    lines = []
    acc = diffs[diffs.metric == "accuracy"].set_index("comparison")
    if len(acc):
        lines.append(
            "Accuracy "
            + "; ".join(f"{c}: {a} {r.mean_a:.2f} vs {b} {r.mean_b:.2f}" for c, r in acc.iterrows())
            + "."
        )
    model_level = diffs[(diffs.layer == -1) & (diffs.metric != "accuracy")]
    sig = model_level[model_level.p_value < alpha]
    for r in sig.itertuples():
        lines.append(
            f"{r.metric} ({r.comparison}) differs: {a} {r.mean_a:.3f} vs {b} {r.mean_b:.3f} (p = "
            f"{r.p_value:.2g})."
        )
    same = model_level[model_level.p_value >= alpha]
    if len(same):
        lines.append(
            f"No significant difference (p >= {alpha}) in: "
            + ", ".join(f"{r.metric} ({r.comparison})" for r in same.itertuples())
            + "."
        )
    layers = diffs[(diffs.layer >= 0) & (diffs.p_value < alpha)]
    if len(layers):
        lines.append(
            "SimAOU icl~gd differs significantly at layer(s) "
            + ", ".join(str(int(l)) for l in layers.layer)
            + "."
        )
    return "\n".join(lines)
