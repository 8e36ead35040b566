"""Study: every ICL-vs-GD metric against the number of demonstrations k, per task and model.

For each model, task and k in `ks` the engine (`compare`) runs once; its Results tables are
concatenated with `k`, `model` and `task` columns. ICL is limited by the context window; GD
is not, so `gd_only_ks` adds larger demonstration sets on which only GD (and ZSL) accuracy is
measured (Shen et al. 2024 train GD on up to 512 demonstrations).

    from iclgd_lens.analyses.k_sweep import run
    result = run("tiny-llama-icl", ks=(1, 2, 4, 8, 16), gd_only_ks=(32, 64))
    result.figures[0].show()

The small helpers the studies share live in `iclgd_lens.study`: `as_bridge` (a model name or
a loaded bridge -> a bridge) and `parse_numbers` (CLI strings -> a sorted list of numbers).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import torch
from tqdm.auto import tqdm

from iclgd_lens import (
    GDConfig,
    IclgdError,
    Recorder,
    Task,
    check_least_work,
    compare,
    encode_prompts,
    label_token_ids,
    metrics,
    resolve_task,
    train_deltas,
    versions,
)
from iclgd_lens.study import (
    StudyResult,
    as_bridge,
    checked_args,
    device_of,
    layer_mean,
    model_name,
    parse_numbers,
    queries_that_ran,
)

QUESTION = (
    "How do ICL, GD and their agreement change with the number of demonstrations k, per task and model?"
)
HEADLINE = ("accuracy", "simaou", "simam_delta", "token_overlap", "dw_cos")
"""Metrics drawn against k (every metric of the engine is in the table)."""


# ---- helpers shared by the studies ----------------------------------------------------------
# ---- the study ------------------------------------------------------------------------------
@checked_args
def run(
    model="tiny-llama-icl",
    task: Task | Sequence[Task] | None = None,
    *,
    ks: int | str | Sequence[int] = (1, 2, 4, 8, 16),
    gd_only_ks: int | str | Sequence[int] = (32, 64),
    gd: GDConfig | str = "dai",
    n_episodes: int = 4,
    n_queries: int = 8,
    baselines: Sequence[str] | bool = ("random", "random_update", "icl_perm"),
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Run `compare` for every k in `ks` (and GD-only accuracy for `gd_only_ks`), per model and task.

    `model` is a name, a bridge, or a list of them; `task` a Task, a list of Tasks, or None (the
    embedded models' mapping task). Returns the engine's tidy rows with `k`, `model`, `task`.
    """
    started = time.time()
    ks = parse_numbers(ks, "ks", minimum=1)
    extra = parse_numbers(gd_only_ks, "gd_only_ks", minimum=1) if gd_only_ks else []
    models = [as_bridge(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    task = resolve_task(task, seed)
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    frames = []
    for bridge in models:
        for t in tasks:
            too_long = []
            for k in tqdm(ks, desc=f"k sweep {t.name}", disable=not progress):
                try:
                    res = compare(
                        bridge,
                        t,
                        gd=gd,
                        k=k,
                        n_episodes=n_episodes,
                        n_queries=n_queries,
                        seed=seed,
                        baselines=baselines,
                        progress=False,
                        artifacts=False,
                    )
                except IclgdError as err:  # ICL prompts past the context window: GD only for this k
                    if "context window" not in str(err):
                        raise
                    too_long.append(k)
                    continue
                frames.append(res.table.assign(model=model_name(bridge), task=t.name))
            for k in [k for k in extra if k not in ks] + too_long:
                frames.append(
                    gd_only_table(bridge, t, gd, k, n_episodes, n_queries, seed).assign(
                        model=model_name(bridge), task=t.name
                    )
                )
    table = pd.concat(frames, ignore_index=True)
    config = dict(
        models=[model_name(b) for b in models],
        tasks=[t.name for t in tasks],
        ks=ks,
        gd_only_ks=extra,
        gd=gd if isinstance(gd, str) else gd.__dict__,
        n_episodes=n_episodes,
        n_queries=queries_that_ran(table),
        n_queries_asked=n_queries,
        baselines=baselines,
        seed=seed,
        versions=versions(),
        run_time_s=round(time.time() - started, 2),
    )
    return StudyResult("k-sweep", QUESTION, table, figures(table), findings(table), config)


def gd_only_table(
    bridge, task: Task, gd: GDConfig | str, k: int, n_episodes: int, n_queries: int, seed: int
) -> pd.DataFrame:
    """ZSL and GD accuracy (argmax over the label words) for k demonstrations that need not fit
    in the context: tidy rows (metric, comparison, layer, head, episode, query, value, k)."""
    config = GDConfig.resolve(gd, task)  # as compare(): a preset name takes the task's gd_lr
    check_least_work(bridge, task, k, n_episodes, n_queries, config, untrained=False)  # before drawing
    episodes = task.episodes(k, n_episodes, n_queries, seed)
    deltas = train_deltas(bridge, bridge.tokenizer, task, episodes, config)
    recorder = Recorder(bridge, [])
    queries = [q for episode in episodes for q in episode.queries]
    words = [episode.label_words for episode in episodes for _ in episode.queries]
    row_episode = torch.tensor(
        [e for e, episode in enumerate(episodes) for _ in episode.queries], dtype=torch.long
    )
    enc = encode_prompts(bridge.tokenizer, task, [()] * len(queries), queries, words).to(device_of(bridge))
    runs = {
        "zsl": recorder.run_batched(enc, "zsl"),
        "gd": recorder.run_batched(enc, "gd", deltas=deltas, row_episode=row_episode),
    }
    rows = []
    for condition, rec in runs.items():
        start = 0
        for e, episode in enumerate(episodes):
            n = len(episode.queries)
            label_ids = label_token_ids(bridge.tokenizer, episode.label_words)
            labels = torch.tensor([q.label for q in episode.queries], device=device_of(bridge))
            correct = (
                metrics.label_correct(rec.logits[start : start + n][:, label_ids], labels)
                .float()
                .cpu()
                .numpy()
            )
            rows += [("accuracy", condition, -1, -1, e, q, float(v)) for q, v in enumerate(correct)]
            start += n
    frame = pd.DataFrame(rows, columns=["metric", "comparison", "layer", "head", "episode", "query", "value"])
    return frame.assign(k=k)


def gd_only_ks(summary: pd.DataFrame) -> list[int]:
    """The ks at which only GD ran (no ICL prompt: beyond the context window, or asked for)."""
    acc = summary[summary.metric == "accuracy"]
    with_icl = set(acc.loc[(acc.comparison == "icl") & acc["mean"].notna(), "k"])
    return sorted(int(k) for k in set(acc["k"]) - with_icl)


def figures(table: pd.DataFrame) -> list:
    """One line chart per headline metric: mean over layers and queries against k, on a log-2 k
    axis with every k labelled; one colour per comparison (the report's), one dash per model; the
    ks where only GD ran marked on every panel."""
    summary = layer_mean(table)
    ks = sorted(int(k) for k in summary["k"].unique())
    only_gd = gd_only_ks(summary)
    figs = []
    for metric in HEADLINE:
        sub = summary[summary.metric == metric]
        if sub.empty:
            continue
        # the intervals are clipped to the metric's range already (`layer_mean`)
        sub = sub.assign(err_plus=sub.ci_high - sub["mean"], err_minus=sub["mean"] - sub.ci_low)
        fig = px.line(
            sub,
            x="k",
            y="mean",
            color="comparison",
            line_dash="model",
            facet_col="task",
            markers=True,
            error_y="err_plus",
            error_y_minus="err_minus",
            log_x=True,
            category_orders={
                "comparison": sorted(sub["comparison"].unique(), key=lambda c: (c != "icl~gd", c))
            },
            labels={"mean": metric, "k": "demonstrations k"},
            title=f"{metric} against k (mean over layers and queries, 95% CI over episodes, within the "
            f"metric's range)",
        )
        fig.update_xaxes(  # every k labelled, nothing else (plotly would label minor ticks "2 3 ... 10 2 3")
            title="k (demonstrations, log2 scale)",
            tickmode="array",
            tickvals=ks,
            ticktext=[str(k) for k in ks],
            minor=dict(ticks="", showgrid=False),
        )
        for k in only_gd:  # on a log axis a shape takes the value, an annotation its log10
            fig.add_shape(
                type="line",
                x0=k,
                x1=k,
                y0=0,
                y1=1,
                xref="x",
                yref="paper",
                line=dict(dash="dot", color="#999"),
            )
            fig.add_annotation(
                x=np.log10(k), y=0.02, xref="x", yref="paper", text="GD only", showarrow=False, xanchor="left"
            )
        figs.append(fig)
    return figs


def findings(table: pd.DataFrame) -> str:
    """A few sentences computed from the table: accuracies at the smallest and largest k, and
    the trend of SimAOU (icl~gd) with k against its random-update baseline."""
    summary = layer_mean(table)
    lines = []
    for (model, task), sub in summary.groupby(["model", "task"]):
        acc = sub[sub.metric == "accuracy"].pivot_table(index="k", columns="comparison", values="mean")
        icl_ks = acc["icl"].dropna() if "icl" in acc else pd.Series(dtype=float)
        if not icl_ks.empty:
            best_k = int(icl_ks.idxmax())
            lines.append(
                f"{model} on {task}: ICL accuracy {icl_ks.iloc[0]:.2f} at k={icl_ks.index[0]} and "
                f"{icl_ks.iloc[-1]:.2f} at k={icl_ks.index[-1]} (best {icl_ks.max():.2f} at k={best_k}); "
                f"zero-shot {acc['zsl'].mean():.2f}."
            )
        gd_only = [int(k) for k in acc.index if "icl" not in acc or pd.isna(acc.loc[k, "icl"])]
        if gd_only:
            lines.append(
                "GD only (no ICL prompt: beyond the context window or asked for) at k = "
                f"{', '.join(map(str, gd_only))}."
            )
        if "gd" in acc:
            gd = acc["gd"].dropna()
            lines.append(
                f"GD accuracy goes from {gd.iloc[0]:.2f} (k={gd.index[0]}) to {gd.iloc[-1]:.2f} "
                f"(k={gd.index[-1]})."
            )
        sim = sub[sub.metric == "simaou"].pivot_table(index="k", columns="comparison", values="mean")
        if "icl~gd" in sim and sim["icl~gd"].notna().sum() >= 2:
            s = sim["icl~gd"].dropna()
            trend = np.corrcoef(np.log(s.index.to_numpy(float)), s.to_numpy())[0, 1]
            base = sim["icl~random_update"].dropna() if "icl~random_update" in sim else None
            base_txt = (
                f" (random update of equal norm: {base.min():.3f} .. {base.max():.3f})"
                if base is not None and len(base)
                else ""
            )
            lines.append(
                f"SimAOU icl~gd ranges {s.min():.3f} .. {s.max():.3f}{base_txt}; its correlation with log k "
                f"is {trend:+.2f}."
            )
    return "\n".join(lines)
