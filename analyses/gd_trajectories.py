"""Study: does any GD setting close the gap to ICL? Metrics against epochs for a grid of
learning rates and trained parameter sets.

For every (lr, params) in the grid and every number of epochs in `epochs`, the engine
(`compare`) runs with `GDConfig(params, lr, epochs, loss_on, optimizer)` on the same episodes.
Parameter sets: "kv" (W_K and W_V of every layer, Dai et al.), "v_single" (W_V of the middle
layer, Shen et al.), "all" (the whole model's linear layers, Shen et al.). The best-agreeing
cell (highest mean of `target` for icl~gd, averaged over layers and queries) is highlighted
and compared with ICL's own ceiling (ICL vs ICL under another demonstration order).

Cost: `gd.train_deltas` returns only the final deltas, so each checkpoint retrains from
scratch (sum(epochs) epochs per (lr, params) instead of max(epochs)); with the doubling
default (1, 2, 4) that is under 2x. A learning rate at which GD diverges is recorded as
a `diverged` row, not an error.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from iclgd_lens import PARAM_SETS, GDConfig, IclgdError, StudyResult, Task, compare, resolve_task, versions
from iclgd_lens.study import (
    as_bridge,
    checked_args,
    layer_mean,
    model_name,
    parse_numbers,
    queries_that_ran,
)

QUESTION = (
    "Does any GD setting (learning rate, trained parameters, epochs) make GD agree with ICL "
    "as well as ICL agrees with itself?"
)
PROBES = ("attn_out", "scores", "kv_outer")
"""Probes recorded per cell: enough for SimAOU, SimAM-delta and dW cosine (no Kendall, which is slow)."""
TRACKED = ("simaou", "simam_delta", "token_overlap", "overlap_cosine", "kl", "accuracy", "dw_cos")
"""Metrics kept from each comparison (model-level and layer-level rows only)."""


@checked_args
def run(
    model="tiny-llama-icl",
    task: Task | None = None,
    *,
    lrs: float | str | Sequence[float] = (1e-3, 1e-2, 1e-1),
    params: str | Sequence[str] = ("kv", "v_single", "all"),
    epochs: int | str | Sequence[int] = (1, 2, 4),
    loss_on: str = "label_tokens",
    optimizer: str = "sgd",
    k: int = 8,
    n_episodes: int = 2,
    n_queries: int = 8,
    target: str = "simaou",
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Metrics of icl~gd against epochs, for every learning rate in `lrs` and parameter set in
    `params`; the best cell by `target` is highlighted. The full setting of Shen et al. is
    `epochs=(1, 2, 5, 10, 20, 50, 100, 200)`, `lrs=(1e-5, 1e-4, 1e-3)`."""
    started = time.time()
    bridge = as_bridge(model)
    lr_list = parse_numbers(lrs, "lrs", kind=float, minimum=0, strict_minimum=True)
    epoch_list = parse_numbers(epochs, "epochs", minimum=1)
    param_list = [p for p in ([params] if isinstance(params, str) else params)]
    param_list = [p.strip() for part in param_list for p in part.split(",") if p.strip()]
    unknown = [p for p in param_list if p not in PARAM_SETS]
    if unknown or not param_list:
        raise IclgdError(
            f"unknown parameter set(s) {unknown or params!r}; choose from {', '.join(PARAM_SETS)}"
        )
    if target not in TRACKED:
        raise IclgdError(f"target must be one of {', '.join(TRACKED)}, got {target!r}")
    task = resolve_task(task, seed)
    cells = [(lr, p, e) for p in param_list for lr in lr_list for e in epoch_list]
    frames = []
    for i, (lr, p, e) in enumerate(cells):
        config = GDConfig(params=p, lr=lr, epochs=e, loss_on=loss_on, optimizer=optimizer)
        if progress:
            print(f"[gd-trajectories {i + 1}/{len(cells)}] params={p} lr={lr:g} epochs={e}", flush=True)
        try:
            res = compare(
                bridge,
                task,
                gd=config,
                k=k,
                n_episodes=n_episodes,
                n_queries=n_queries,
                seed=seed,
                baselines=("icl_perm",),
                probes=PROBES,
                progress=False,
                artifacts=False,
            )
        except IclgdError as err:
            if "diverged" not in str(err):
                raise
            frames.append(
                pd.DataFrame(
                    [
                        dict(
                            metric="diverged",
                            comparison="gd",
                            layer=-1,
                            head=-1,
                            episode=-1,
                            query=-1,
                            value=1.0,
                        )
                    ]
                )
            )
        else:
            t = res.table
            frames.append(t[t.metric.isin(TRACKED) & (t["head"] == -1)])
        frames[-1] = frames[-1].assign(lr=lr, params=p, epochs=e)
    table = pd.concat(frames, ignore_index=True)
    config = dict(
        model=model_name(bridge),
        task=task.name,
        lrs=lr_list,
        params=param_list,
        epochs=epoch_list,
        loss_on=loss_on,
        optimizer=optimizer,
        k=k,
        n_episodes=n_episodes,
        n_queries=queries_that_ran(table),
        n_queries_asked=n_queries,
        target=target,
        seed=seed,
        versions=versions(),
        run_time_s=round(time.time() - started, 2),
    )
    best = best_cell(table, target)
    return StudyResult(
        "gd-trajectories",
        QUESTION,
        table,
        figures(table, target, best),
        findings(table, target, best),
        config,
    )


def cell_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (over layers, then queries) per (params, lr, epochs, metric, comparison)."""
    parts = []
    for (p, lr, e), group in table[table.metric != "diverged"].groupby(["params", "lr", "epochs"]):
        parts.append(
            layer_mean(group.drop(columns=["params", "lr", "epochs"])).assign(params=p, lr=lr, epochs=e)
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def best_cell(table: pd.DataFrame, target: str) -> dict | None:
    """The (params, lr, epochs) whose icl~gd `target` is best (lowest for kl, else highest; for
    accuracy, GD's own accuracy)."""
    s = cell_summary(table)
    if s.empty:
        return None
    comparison = "gd" if target == "accuracy" else "icl~gd"
    rows = s[(s.metric == target) & (s.comparison == comparison)].dropna(subset=["mean"])
    if rows.empty:
        return None
    row = rows.loc[rows["mean"].idxmin() if target == "kl" else rows["mean"].idxmax()]
    return dict(
        params=row["params"], lr=float(row["lr"]), epochs=int(row["epochs"]), value=float(row["mean"])
    )


def figures(table: pd.DataFrame, target: str, best: dict | None) -> list:
    """`target` and accuracy against epochs: one panel per parameter set, one line per lr;
    ICL's ceiling (icl~icl_perm) and ICL accuracy as dotted lines; the best cell starred."""
    s = cell_summary(table)
    if s.empty:
        return []
    epochs = sorted(int(e) for e in s["epochs"].unique())
    figs = []
    for metric, comparison, floor_comparison in (
        (
            target,
            "gd" if target == "accuracy" else "icl~gd",
            "icl" if target == "accuracy" else "icl~icl_perm",
        ),
        ("accuracy", "gd", "icl"),
    ):
        sub = s[(s.metric == metric) & (s.comparison == comparison)].sort_values("epochs")
        if sub.empty:
            continue
        fig = px.line(
            sub,
            x="epochs",
            y="mean",
            color=sub["lr"].map(lambda v: f"lr={v:g}"),
            facet_col="params",
            markers=True,
            log_x=True,
            labels={"mean": f"{metric} ({comparison})", "color": "learning rate"},
            title=f"{metric} ({comparison}) against GD epochs; dotted: {floor_comparison}",
        )
        floor = s[(s.metric == metric) & (s.comparison == floor_comparison)]["mean"].mean()
        if np.isfinite(floor):
            fig.add_hline(y=floor, line_dash="dot", annotation_text=floor_comparison)
        if best is not None and metric == target:
            panel = list(dict.fromkeys(sub["params"])).index(best["params"]) + 1
            fig.add_trace(
                go.Scatter(
                    x=[best["epochs"]],
                    y=[best["value"]],
                    mode="markers",
                    name="best",
                    marker=dict(symbol="star", size=16, color="black"),
                ),
                row=1,
                col=panel,
            )
        fig.update_xaxes(  # every epoch count labelled (the report's pages restyle the rest)
            type="log",
            tickmode="array",
            tickvals=epochs,
            ticktext=[str(e) for e in epochs],
            minor=dict(ticks=""),
        )
        figs.append(fig)
    return figs


def findings(table: pd.DataFrame, target: str, best: dict | None) -> str:
    """The best cell, how it compares with ICL's own ceiling and accuracy, and diverged cells."""
    s = cell_summary(table)
    lines = []
    diverged = table[table.metric == "diverged"][["params", "lr", "epochs"]].drop_duplicates()
    if len(diverged):
        lines.append(
            "GD diverged at: "
            + "; ".join(f"{r.params} lr={r.lr:g} epochs={r.epochs}" for r in diverged.itertuples())
            + "."
        )
    if best is None:
        return "\n".join(lines + ["No GD setting finished; lower the learning rates."])
    lines.append(
        ("Best GD accuracy: " if target == "accuracy" else f"Best agreement ({target}, icl~gd): ")
        + f"params={best['params']}, lr={best['lr']:g}, "
        f"epochs={best['epochs']}: {best['value']:.3f}."
    )
    ceiling = s[(s.metric == target) & (s.comparison == "icl~icl_perm")]["mean"].mean()
    if np.isfinite(ceiling) and target != "accuracy":
        closes = best["value"] >= ceiling if target != "kl" else best["value"] <= ceiling
        lines.append(
            f"ICL against itself under another demonstration order: {ceiling:.3f}; the best GD setting "
            + (
                "reaches that ceiling."
                if closes
                else f"stays {abs(ceiling - best['value']):.3f} away from it."
            )
        )
    acc = s[s.metric == "accuracy"]
    cell = acc[
        (acc.params == best["params"]) & (acc.lr == best["lr"]) & (acc.epochs == best["epochs"])
    ].set_index("comparison")["mean"]
    if {"zsl", "icl", "gd"} <= set(cell.index):
        lines.append(
            f"Accuracy there: zero-shot {cell['zsl']:.2f}, ICL {cell['icl']:.2f}, GD {cell['gd']:.2f}; "
            f"best GD accuracy anywhere in the grid {acc[acc.comparison == 'gd']['mean'].max():.2f}."
        )
    return "\n".join(lines)
