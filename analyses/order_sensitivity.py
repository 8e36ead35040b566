"""Study: how much does the order of the demonstrations change ICL, and GD (Shen et al. 2024)?

For every episode, `n_permutations` orders of its demonstrations are drawn (the first is the
prompt order; the others are `gd.demo_order(k, order_seed)` for order seeds derived from
`seed`, all different from each other and from the prompt order (`distinct_orders`), so order
p of ICL and of GD is the same permutation). Then:

- ICL: the demonstrations in that order in the prompt;
- GD with batch sizes 1, 2, 4 (those below k) and full batch: the SGD steps in that order
  (exactly what `GDConfig(order_seed=...)` does; here the permuted demonstration sets are
  trained in one batched run).

Metrics per (episode, query):
- `sen`: Shen's order sensitivity, the population std over orders of each output
  probability at the read position, summed over the vocabulary (`metrics.order_sensitivity`);
- `attn_sen` (per layer): |std over orders of the attention output at the read position|
  divided by |mean attention update| (mean over orders of h - h_ZSL): the spread of the
  update relative to its size (0 = the order does not move the update);
- `order_overlap`: top-10 token overlap between order p and the prompt order (p >= 1),
  averaged over p: the ICL-vs-ICL ceiling of Shen et al. (ICL's agreement with itself) for
  ICL, its analogue for GD;
- `icl_gd_overlap`: top-10 token overlap of ICL and GD under the same order.

Full-batch GD sums the same gradients whatever the order, so its `sen` is 0 up to float
rounding: a built-in check of the pipeline.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from iclgd_lens import (
    Episode,
    GDConfig,
    IclgdError,
    Recorder,
    Recording,
    StudyResult,
    Task,
    check_least_work,
    demo_order,
    encode_prompts,
    metrics,
    resolve_task,
    stats,
    train_deltas,
    versions,
)
from iclgd_lens.study import as_bridge, checked_args, device_of, model_name, parse_numbers

QUESTION = (
    "How much does the order of the demonstrations change the output of ICL, "
    "and of GD with different batch sizes?"
)
COLUMNS = ["metric", "method", "batch_size", "layer", "episode", "query", "value"]


@checked_args
def run(
    model="tiny-llama-icl",
    task: Task | None = None,
    *,
    k: int = 8,
    n_permutations: int = 10,
    batch_sizes: int | str | Sequence[int] = (1, 2, 4),
    gd: GDConfig | str = "dai",
    n_episodes: int = 4,
    n_queries: int = 8,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Order sensitivity of ICL and of GD (batch sizes `batch_sizes` below k, and full batch).

    `gd` sets everything of GD except batch size and order (e.g. `GDConfig.dai(lr=1e-2)`); a preset
    name uses the task's `gd_lr` where it has one (as `compare` does); `batch_size` bounds the rows
    of one recording forward pass.
    """
    started = time.time()
    bridge = as_bridge(model)
    task = resolve_task(task, seed)
    if k < 2:
        raise IclgdError(f"order sensitivity needs k >= 2 demonstrations to permute, got k={k}")
    if n_permutations < 2:
        raise IclgdError(f"order sensitivity needs n_permutations >= 2, got {n_permutations}")
    if n_permutations > math.factorial(k):
        raise IclgdError(
            f"k={k} demonstrations have only {math.factorial(k)} orders, fewer than n_permutations="
            f"{n_permutations}; ask for at most {math.factorial(k)} or use a larger k"
        )
    base = GDConfig.resolve(
        gd, task
    )  # a preset name takes the task's learning rate (Task.gd_lr), as in compare()
    none_given = np.size(batch_sizes) == 0 or (isinstance(batch_sizes, str) and not batch_sizes.strip(", "))
    given = [] if none_given else parse_numbers(batch_sizes, "batch_sizes")  # () -> full batch only
    sizes = [b for b in given if 1 <= b < k] + [k]
    check_least_work(bridge, task, k, n_episodes, n_queries, base, untrained=False)  # before drawing
    episodes = task.episodes(k, n_episodes, n_queries, seed)
    order_seeds, orders = distinct_orders(k, n_permutations, seed)
    permuted = permuted_episodes(episodes, orders)  # index e * P + p

    recorder = Recorder(bridge, ["attn_out"])
    zsl = _record(recorder, task, episodes, [False] * len(episodes), "zsl", batch_size)  # rows e * Q + q
    runs = {"icl": _record(recorder, task, permuted, [True] * len(permuted), "icl", batch_size)}
    for size in sizes:
        config = replace(base, batch_size=size, order_seed=None)
        deltas = train_deltas(bridge, bridge.tokenizer, task, permuted, config, progress=progress)
        runs[f"gd_b{size}" if size < k else "gd_full"] = _record(
            recorder, task, permuted, [False] * len(permuted), "gd", batch_size, deltas
        )

    shape = dict(e=n_episodes, p=n_permutations)
    frames = [
        sensitivity_rows(name, rec, zsl, shape, size) for (name, rec), size in zip(runs.items(), [0] + sizes)
    ]
    p_icl = _probs(runs["icl"], shape)
    for (name, rec), size in zip(list(runs.items())[1:], sizes):
        overlap = metrics.token_overlap(p_icl, _probs(rec, shape), 10).mean(1)  # [E, Q]
        frames.append(_rows("icl_gd_overlap", name, size, -1, overlap))
    table = pd.concat(frames, ignore_index=True)
    config = dict(
        model=model_name(bridge),
        task=task.name,
        k=k,
        n_permutations=n_permutations,
        batch_sizes=sizes,
        order_seeds=order_seeds,
        gd=base.__dict__,
        n_episodes=n_episodes,
        n_queries=len(episodes[0].queries),
        seed=seed,
        versions=versions(),
        run_time_s=round(time.time() - started, 2),
    )
    return StudyResult("order-sensitivity", QUESTION, table, figures(table), findings(table, k), config)


def distinct_orders(k: int, n_permutations: int, seed: int) -> tuple[list[int | None], list[list[int]]]:
    """The prompt order and `n_permutations - 1` other orders of k demonstrations, all different:
    `gd.demo_order(k, s)` for the order seeds s = seed * 1000 + 1, + 2, ..., skipping a seed whose
    order is the prompt order or one drawn already (independent shuffles repeat at small k: at
    k = 2 eight of nine would). Returns (order seeds, orders); the first seed is None. Needs
    n_permutations <= k!."""
    order_seeds: list[int | None] = [None]
    orders = [demo_order(k, None)]
    candidate = seed * 1000
    while len(orders) < n_permutations:
        candidate += 1
        order = demo_order(k, candidate)
        if order not in orders:
            order_seeds.append(candidate)
            orders.append(order)
    return order_seeds, orders


def permuted_episodes(episodes: list[Episode], orders: list[list[int]]) -> list[Episode]:
    """Every episode under every order of its demonstrations: index e * len(orders) + p."""
    return [
        Episode(tuple(ep.demos[i] for i in order), ep.queries, ep.label_words)
        for ep in episodes
        for order in orders
    ]


def _record(
    recorder: Recorder,
    task: Task,
    episodes: list[Episode],
    with_demos: list[bool],
    condition: str,
    batch_size: int,
    deltas=None,
) -> Recording:
    """Attention output and read logits of every (episode, query): rows e * Q + q.

    With `deltas` (one delta per episode of `episodes`) the GD condition is recorded.
    """
    model = recorder.model
    demo_sets, queries, words, row_episode = [], [], [], []
    for e, (episode, demos) in enumerate(zip(episodes, with_demos)):
        for query in episode.queries:
            demo_sets.append(episode.demos if demos else ())
            queries.append(query)
            words.append(episode.label_words)
            row_episode.append(e)
    enc = encode_prompts(
        model.tokenizer, task, demo_sets, queries, words, max_length=getattr(model.cfg, "n_ctx", None)
    ).to(device_of(model))
    rows = torch.tensor(row_episode, dtype=torch.long)
    return recorder.run_batched(enc, condition, batch_size=batch_size, deltas=deltas, row_episode=rows)


def _probs(rec: Recording, shape: dict) -> torch.Tensor:
    """Output distributions at the read position: [E, P, Q, vocab]."""
    p = torch.softmax(rec.logits.float(), -1)
    return p.reshape(shape["e"], shape["p"], -1, p.shape[-1])


def sensitivity_rows(method: str, rec: Recording, zsl: Recording, shape: dict, size: int) -> pd.DataFrame:
    """`sen`, `order_overlap` (model level) and per-layer `attn_sen` of one method."""
    E, P = shape["e"], shape["p"]
    probs = _probs(rec, shape)  # [E, P, Q, V]
    sen = metrics.order_sensitivity(probs.transpose(0, 1))  # [E, Q]
    overlap = metrics.token_overlap(probs[:, 1:], probs[:, :1].expand_as(probs[:, 1:]), 10).mean(1)  # [E, Q]
    h = rec["attn_out"].float()  # [L, E*P*Q, d]
    L, d = h.shape[0], h.shape[-1]
    h = h.reshape(L, E, P, -1, d)  # [L, E, P, Q, d]
    h_zsl = zsl["attn_out"].float().reshape(L, E, 1, -1, d)  # [L, E, 1, Q, d]
    spread = torch.linalg.vector_norm(h.std(dim=2, correction=0), dim=-1)  # [L, E, Q]
    update = torch.linalg.vector_norm(h.mean(2, keepdim=True) - h_zsl, dim=-1)[:, :, 0]  # [L, E, Q]
    attn_sen = torch.where(update > 0, spread / torch.where(update > 0, update, 1.0), torch.nan)
    frames = [_rows("sen", method, size, -1, sen), _rows("order_overlap", method, size, -1, overlap)]
    frames += [_rows("attn_sen", method, size, layer, attn_sen[layer]) for layer in range(L)]
    return pd.concat(frames, ignore_index=True)


def _rows(metric: str, method: str, size: int, layer: int, values: torch.Tensor) -> pd.DataFrame:
    """Tidy rows of a [E, Q] tensor."""
    v = values.detach().float().cpu().numpy()
    E, Q = v.shape
    return pd.DataFrame(
        {
            "metric": metric,
            "method": method,
            "batch_size": size,
            "layer": layer,
            "episode": np.repeat(np.arange(E), Q),
            "query": np.tile(np.arange(Q), E),
            "value": v.reshape(-1),
        }
    )[COLUMNS]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval per (metric, method, layer), over episodes: the queries of one
    episode share its demonstrations and orders, so each episode's values are averaged first
    (`stats.episode_summary`). Columns: metric, method, layer, mean, ci_low, ci_high, n_episodes, n."""
    return stats.episode_summary(table, ["metric", "method", "layer"], sort=False)


def medians(table: pd.DataFrame, metric: str = "sen") -> pd.DataFrame:
    """Per method: the median over all (episode, query) values, the median of the episode means,
    and the largest episode mean (what can pull a mean away from its median). Columns: method,
    median, median_of_episodes, max_episode, n_episodes."""
    rows = table[table.metric == metric]
    per_episode = rows.groupby(["method", "episode"], sort=False)["value"].mean()
    out = pd.DataFrame(
        {
            "median": rows.groupby("method", sort=False)["value"].median(),
            "median_of_episodes": per_episode.groupby(level="method", sort=False).median(),
            "max_episode": per_episode.groupby(level="method", sort=False).max(),
            "n_episodes": per_episode.groupby(level="method", sort=False).size(),
        }
    )
    return out.reset_index()


def figures(table: pd.DataFrame) -> list:
    """Sen per method: mean with its 95% CI, median, and each episode's mean side by side;
    attention-update sensitivity per layer; order overlap. Colours: the report's (ICL orange,
    GD purple)."""
    s = summary(table)
    s = s.assign(err_plus=s.ci_high - s["mean"], err_minus=s["mean"] - s.ci_low)
    sen = s[s.metric == "sen"]
    med = medians(table).set_index("method")
    methods = list(sen["method"])
    positive = table.loc[(table.metric == "sen") & (table.value > 0), "value"]
    floor = float(positive.min()) / 2 if len(positive) else 1e-9  # the log axis' bottom
    lows = np.maximum(sen["ci_low"].to_numpy(), floor)
    fig_sen = go.Figure()
    for i, method in enumerate(methods):  # one bar trace per method: the report colours it by name
        fig_sen.add_trace(
            go.Bar(
                x=[method],
                y=[sen["mean"].iloc[i]],
                error_y=dict(
                    type="data", array=[sen["err_plus"].iloc[i]], arrayminus=[sen["mean"].iloc[i] - lows[i]]
                ),
                opacity=0.6,
                name=method,
                legendgroup="mean",
                legendgrouptitle_text="mean [95% CI over episodes]",
            )
        )
    fig_sen.add_trace(
        go.Scatter(
            x=methods,
            y=[med.loc[m, "median"] for m in methods],
            mode="markers",
            marker=dict(symbol="diamond", size=13, color="black"),
            name="median over (episode, query)",
        )
    )
    episodes = table[table.metric == "sen"].groupby(["method", "episode"], sort=False)["value"].mean()
    fig_sen.add_trace(
        go.Scatter(
            x=[m for m, _ in episodes.index],
            y=episodes.to_numpy(),
            mode="markers",
            marker=dict(symbol="circle-open", size=9, color="#555"),
            name="each episode's mean",
        )
    )
    fig_sen.update_layout(
        title="Order sensitivity Sen (Shen et al.): mean, median and each episode (log scale; intervals "
        "cut at the axis floor)",
        yaxis=dict(title="Sen (sum over vocabulary of std over orders)", type="log"),
        xaxis_title="method",
    )
    layers = s[s.metric == "attn_sen"]
    fig_layers = px.line(
        layers,
        x="layer",
        y="mean",
        color="method",
        markers=True,
        error_y="err_plus",
        error_y_minus="err_minus",
        labels={"mean": "|std over orders of h| / |mean update h - h_ZSL|"},
        title="Order sensitivity of the attention update at the read position, per layer",
    )
    fig_layers.update_xaxes(dtick=1, tickformat="d")  # whole layers
    overlap = s[s.metric.isin(["order_overlap", "icl_gd_overlap"])]
    fig_overlap = px.bar(
        overlap,
        x="method",
        y="mean",
        color="metric",
        barmode="group",
        error_y="err_plus",
        error_y_minus="err_minus",
        range_y=[0, 1.05],
        labels={"mean": "top-10 token overlap"},
        title=(
            "Agreement across orders (order_overlap; ICL's is Shen's ceiling) "
            "and ICL vs GD under the same order"
        ),
    )
    return [fig_sen, fig_layers, fig_overlap]


def findings(table: pd.DataFrame, k: int) -> str:
    """Sentences computed from the table: Sen per method, their ratio, the layer whose
    attention update is most order-sensitive under ICL, and the agreement floor."""
    s = summary(table).set_index(["metric", "method", "layer"])
    sen = s.loc["sen"]["mean"].droplevel("layer")
    ci = s.loc["sen"][["ci_low", "ci_high"]].droplevel("layer")
    parts = [f"{m}: {sen[m]:.4f} [{ci.loc[m, 'ci_low']:.4f}, {ci.loc[m, 'ci_high']:.4f}]" for m in sen.index]
    n_episodes = int(s.loc["sen"]["n_episodes"].max())
    lines = [
        f"Order sensitivity Sen over {k} demonstrations (mean, 95% CI over {n_episodes} episodes): "
        + "; ".join(parts)
        + "."
    ]
    med = medians(table).set_index("method")
    lines.append(
        "Medians over (episode, query) values: "
        + "; ".join(f"{m}: {med.loc[m, 'median']:.4f}" for m in med.index)
        + "."
    )
    gd_methods = [m for m in sen.index if m.startswith("gd_b")]
    if gd_methods:
        most = max(gd_methods, key=lambda m: sen[m])
        if sen[most] > 0:
            line = (
                f"By the means ICL is {sen['icl'] / sen[most]:.2g}x as order-sensitive as the most "
                f"order-sensitive GD setting ({most})"
            )
            if med.loc[most, "median"] > 0:
                line += f"; by the medians {med.loc['icl', 'median'] / med.loc[most, 'median']:.2g}x"
            lines.append(line + ".")
            mean_says, median_says = (
                sen["icl"] > sen[most],
                med.loc["icl", "median"] > med.loc[most, "median"],
            )
            if mean_says != median_says:
                top = most if median_says else "icl"
                episodes = table[(table.metric == "sen") & (table.method == top)].groupby("episode")["value"]
                per_episode = episodes.mean()
                lines.append(
                    f"The two disagree because the mean of {top} is pulled up by its most order-sensitive "
                    f"episode (mean Sen {per_episode.max():.4f} against a median of "
                    f"{med.loc[top, 'median']:.4f}; {int((per_episode > med.loc[top, 'median']).sum())} of "
                    f"{len(per_episode)} episodes lie above that median): with few episodes one "
                    "demonstration set whose output flips under some orders dominates the mean, while the "
                    "median says what a typical episode shows."
                )
        else:
            lines.append(
                "No GD setting is order-sensitive at all here (Sen 0): check that GD moves the model "
                "(learning rate)."
            )
    if "gd_full" in sen:
        lines.append(
            f"Full-batch GD: Sen = {sen['gd_full']:.2e} (order-invariant up to float rounding, "
            "as it must be)."
        )
    layer_sen = s.loc["attn_sen"]["mean"]
    if "icl" in layer_sen.index.get_level_values(0):
        icl_layers = layer_sen.loc["icl"]
        lines.append(
            f"The ICL attention update is most order-sensitive at layer {int(icl_layers.idxmax())} (relative "
            f"spread {icl_layers.max():.3f}; least at layer {int(icl_layers.idxmin())}: "
            f"{icl_layers.min():.3f})."
        )
    overlap = s.loc["order_overlap"]["mean"].droplevel("layer")
    lines.append(
        f"Top-10 overlap across orders: ICL {overlap['icl']:.2f} (the ICL-vs-ICL ceiling)"
        + "".join(f", {m} {overlap[m]:.2f}" for m in overlap.index if m != "icl")
        + "."
    )
    if "icl_gd_overlap" in s.index.get_level_values(0):
        icl_gd = s.loc["icl_gd_overlap"]["mean"].droplevel("layer")
        lines.append(
            "ICL vs GD overlap under the same order: "
            + ", ".join(f"{m} {icl_gd[m]:.2f}" for m in icl_gd.index)
            + "."
        )
    return "\n".join(lines)
