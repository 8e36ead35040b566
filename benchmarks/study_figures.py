"""Print the figures of the study pages in docs/studies/: each study run with its defaults on the
embedded models, on one CPU thread, and its table summarised the way the page shows it.

    python benchmarks/study_figures.py k-sweep            # docs/studies/k-sweep.md
    python benchmarks/study_figures.py order-sensitivity  # docs/studies/order-sensitivity.md
    python benchmarks/study_figures.py gd-trajectories    # docs/studies/gd-trajectories.md
    python benchmarks/study_figures.py weight-properties  # docs/studies/weight-properties.md
    python benchmarks/study_figures.py conflict-probe     # docs/studies/conflict-probe.md
    python benchmarks/study_figures.py icl-vs-iwl         # docs/studies/icl-vs-iwl.md
    python benchmarks/study_figures.py all                # all of the above, one after the other

(docs/studies/iclobj-vs-emergent.md has its own script, `benchmarks/iclobj_vs_emergent.py`.)

Each section prints the study's run time, its `findings` exactly as the study writes them, and
markdown tables computed from `StudyResult.table` with the studies' own summary functions.
Means of layer-level metrics are taken over layers first, then per episode; intervals are 95%
t-intervals over the episode means (`iclgd_lens.study.layer_mean`, `iclgd_lens.engine.stats`): the
queries of one episode share its demonstrations and are not independent samples.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import typer

from iclgd_lens.engine import stats
from iclgd_lens.study import layer_mean

REPO = Path(__file__).resolve().parents[1]


def fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ci(row, digits: int = 3) -> str:
    """'mean [low, high]' of a summary row (NaN bounds shown as the mean alone)."""
    if math.isnan(row["ci_low"]):
        return fmt(row["mean"], digits)
    return f"{fmt(row['mean'], digits)} [{fmt(row['ci_low'], digits)}, {fmt(row['ci_high'], digits)}]"


def header(name: str, result, started: float) -> None:
    print(
        f"\n===== {name}: {time.time() - started:.1f} s on {torch.get_num_threads()} thread(s) "
        f"(the study's own run_time_s: {result.config.get('run_time_s', float('nan'))})\n"
    )
    print("findings:\n" + result.findings + "\n")


# ---- k-sweep ----------------------------------------------------------------------------------
def k_sweep() -> None:
    from iclgd_lens.analyses.k_sweep import run

    started = time.time()
    result = run("tiny-llama-icl", progress=False)
    header("k-sweep", result, started)
    s = layer_mean(result.table).set_index(["k", "metric", "comparison"])
    get = lambda k, m, c: s.loc[(k, m, c)] if (k, m, c) in s.index else None
    cell = lambda k, m, c, d=3: (
        "" if get(k, m, c) is None or math.isnan(get(k, m, c)["mean"]) else fmt(get(k, m, c)["mean"], d)
    )
    cell_ci = lambda k, m, c, d=3: "" if get(k, m, c) is None else ci(get(k, m, c), d)
    n = s.reset_index().query("metric == 'accuracy' and comparison == 'gd'")
    print(
        "episodes x queries per k: "
        + ", ".join(f"k={int(r.k)}: {int(r.n_episodes)} episodes, {int(r.n)} queries" for r in n.itertuples())
        + "\n"
    )
    icl_ks = sorted(result.config["ks"])
    all_ks = sorted(set(icl_ks) | set(result.config["gd_only_ks"]))
    print(
        "| k | acc ZSL | acc ICL | acc GD | KL(GD‖ZSL) | SimAOU icl~gd | SimAOU icl~random_update "
        "| SimAOU icl~random | SimAOU icl~icl_perm |"
    )
    print("|---" * 9 + "|")
    for k in all_ks:
        if k not in icl_ks or get(k, "accuracy", "icl") is None:
            print(
                f"| {k} (GD only) | {cell(k, 'accuracy', 'zsl', 2)} | — | {cell_ci(k, 'accuracy', 'gd', 2)} |"
                + " |" * 5
            )
            continue
        print(
            f"| {k} | {cell(k, 'accuracy', 'zsl', 2)} | {cell(k, 'accuracy', 'icl', 2)} "
            f"| {cell_ci(k, 'accuracy', 'gd', 2)} | {cell(k, 'kl', 'gd~zsl')} "
            f"| {cell_ci(k, 'simaou', 'icl~gd')} | {cell(k, 'simaou', 'icl~random_update')} "
            f"| {cell(k, 'simaou', 'icl~random')} | {cell(k, 'simaou', 'icl~icl_perm') or '—'} |"
        )
    print(
        "\n| k | SimAOU_norm icl~gd | SimAOU_norm icl~random (Dai) | SimAOU_norm icl~random_update "
        "| SimAM-delta icl~gd | dW cos icl~gd (icl~random_update) | Kendall token icl~gd (icl~random) "
        "| Kendall example icl~gd (icl~random) | top-10 overlap icl~gd (icl~icl_perm) |"
    )
    print("|---" * 9 + "|")
    for k in icl_ks:
        if get(k, "accuracy", "icl") is None:
            continue
        print(
            f"| {k} | {cell_ci(k, 'simaou_norm', 'icl~gd')} | {cell(k, 'simaou_norm', 'icl~random')} "
            f"| {cell(k, 'simaou_norm', 'icl~random_update')} | {cell(k, 'simam_delta', 'icl~gd')} "
            f"| {cell(k, 'dw_cos', 'icl~gd')} ({cell(k, 'dw_cos', 'icl~random_update')}) "
            f"| {cell(k, 'kendall_token', 'icl~gd')} ({cell(k, 'kendall_token', 'icl~random')}) "
            f"| {cell(k, 'kendall_example', 'icl~gd') or '—'} "
            f"({cell(k, 'kendall_example', 'icl~random') or '—'}) "
            f"| {cell(k, 'token_overlap', 'icl~gd', 2)} "
            f"({cell(k, 'token_overlap', 'icl~icl_perm', 2) or '—'}) |"
        )


# ---- order-sensitivity ---------------------------------------------------------------------
def order_sensitivity() -> None:
    from iclgd_lens.analyses.order_sensitivity import run, summary

    started = time.time()
    result = run("tiny-llama-icl", progress=False)
    header("order-sensitivity", result, started)
    t = result.table
    s = summary(t).set_index(["metric", "method", "layer"])
    n_ep = int(s.loc["sen"]["n_episodes"].max())
    print(
        f"| method | Sen mean [95% CI over {n_ep} episodes] | Sen median (all episode, query values) "
        f"| per-episode mean Sen | top-10 overlap across orders | top-10 overlap ICL vs GD, same order |"
    )
    print("|---|---|---|---|---|---|")
    for method in dict.fromkeys(t.method):
        sen = t[(t.metric == "sen") & (t.method == method)]
        per_episode = stats.episode_means(sen.value.to_numpy(), sen.episode.to_numpy())
        row = s.loc[("sen", method, -1)]
        overlap = s.loc[("order_overlap", method, -1)]["mean"]
        icl_gd = (
            s.loc[("icl_gd_overlap", method, -1)]["mean"]
            if ("icl_gd_overlap", method, -1) in s.index
            else float("nan")
        )
        digits = 4 if row["mean"] > 1e-4 else 8
        print(
            f"| {method} | {ci(row, digits)} ({row['mean']:.2e}) | {np.median(sen.value):.4f} "
            f"| {', '.join(f'{v:.3f}' for v in per_episode)} | {overlap:.2f} | {fmt(icl_gd, 2)} |"
        )
    icl = t[(t.metric == "sen") & (t.method == "icl")].groupby("episode").value.mean()
    gd = t[(t.metric == "sen") & (t.method == "gd_b1")].groupby("episode").value.mean()
    print(
        "\nper episode, ICL Sen / GD batch-1 Sen: " + ", ".join(f"{icl[e] / gd[e]:.1f}x" for e in icl.index)
    )
    layers = s.loc["attn_sen"].loc["icl"]["mean"]
    print(
        "ICL attention-update relative spread per layer: "
        + ", ".join(f"layer {int(k)} {v:.3f}" for k, v in layers.items())
    )


# ---- gd-trajectories -----------------------------------------------------------------------
def gd_trajectories() -> None:
    from iclgd_lens.analyses.gd_trajectories import best_cell, cell_summary, run

    started = time.time()
    result = run("tiny-llama-icl", progress=False)
    header("gd-trajectories", result, started)
    t, cfg = result.table, result.config
    s = cell_summary(t)
    best = best_cell(t, "simaou")
    key = ["params", "lr", "epochs", "metric", "comparison"]
    si = s.set_index(key)
    print(
        f"{cfg['n_episodes']} episodes; (episode, query) values per cell: "
        f"{int(s[(s.metric == 'simaou') & (s.comparison == 'icl~gd')]['n'].max())}"
    )
    diverged = t[t.metric == "diverged"]
    print(f"diverged cells: {len(diverged[['params', 'lr', 'epochs']].drop_duplicates())}")
    floor = s[(s.metric == "simaou") & (s.comparison == "icl~icl_perm")]["mean"].mean()
    print(f"SimAOU icl~icl_perm (mean over cells): {floor:.3f}\n")
    epochs = cfg["epochs"]
    print("| params | lr | " + " | ".join(f"{e} epoch{'s' if e > 1 else ''}" for e in epochs) + " |")
    print("|---|---|" + "---|" * len(epochs))
    for p in cfg["params"]:
        for lr in cfg["lrs"]:
            cells = []
            for e in epochs:
                if (p, lr, e, "simaou", "icl~gd") not in si.index:
                    cells.append("diverged")
                    continue
                row = si.loc[(p, lr, e, "simaou", "icl~gd")]
                is_best = best and (p, lr, e) == (best["params"], best["lr"], best["epochs"])
                cells.append(f"**{ci(row)}**" if is_best else fmt(row["mean"]))
            print(f"| {p} | {lr:g} | " + " | ".join(cells) + " |")
    acc = s[(s.metric == "accuracy") & (s.comparison == "gd")]
    print(
        "\nGD accuracy per cell (cells not at 0.50): "
        + (
            "; ".join(
                f"{r.params} lr={r.lr:g} epochs={r.epochs}: {r.mean:.2f}"
                for r in acc.itertuples()
                if abs(r.mean - 0.5) > 1e-9
            )
            or "none"
        )
    )
    ov = s[(s.metric == "token_overlap") & (s.comparison == "icl~gd")]["mean"]
    ov_floor = s[(s.metric == "token_overlap") & (s.comparison == "icl~icl_perm")]["mean"].mean()
    print(f"top-10 overlap icl~gd: {ov.min():.2f} .. {ov.max():.2f} (icl~icl_perm {ov_floor:.3f})")
    kl = s[(s.metric == "kl") & (s.comparison == "icl~gd")]
    low = kl.loc[kl["mean"].idxmin()]
    print(
        f"lowest KL(ICL‖GD): {low['mean']:.2f} at {low['params']}, lr {low['lr']:g}, "
        f"{int(low['epochs'])} epochs"
    )
    vs = s[(s.metric == "simaou") & (s.comparison == "icl~gd") & (s.params == "v_single")]["mean"]
    if len(vs):
        print(f"SimAOU icl~gd of v_single: {vs.min():.3f} .. {vs.max():.3f}")
    if best:
        row = si.loc[(best["params"], best["lr"], best["epochs"], "simaou", "icl~gd")]
        print(f"best cell: half-width of its 95% interval {(row['ci_high'] - row['ci_low']) / 2:.3f}")


# ---- weight-properties ---------------------------------------------------------------------
def _weight_table(table: pd.DataFrame) -> None:
    nz = table[table.metric == "near_zero_fraction"].groupby(["source", "matrix"]).value.max().unstack()
    dist = (
        table[table.metric == "scaled_identity_distance"].groupby("source").value.agg(["mean", "min", "max"])
    )
    rank = table[(table.metric == "rank_fraction") & (table.layer >= 0)].groupby("matrix").value.mean()
    print(
        "| source | W_Q near-zero (max over t, layers) | W_K | W_V | distance of W_K^T W_Q, "
        "mean (heads min..max) |"
    )
    print("|---|---|---|---|---|")
    for source in dict.fromkeys(table.source):
        cells = [
            f"{100 * nz.loc[source, m]:.2f}%" if m in nz.columns and not math.isnan(nz.loc[source, m]) else ""
            for m in ("W_Q", "W_K", "W_V")
        ]
        d = dist.loc[source]
        print(f"| {source} | " + " | ".join(cells) + f" | {d['mean']:.3f} ({d['min']:.3f}..{d['max']:.3f}) |")
    print(
        "model rank fraction, mean over layers (and heads for W_K^T W_Q): "
        + ", ".join(f"{m} {v:.3f}" for m, v in rank.items())
    )


def weight_properties() -> None:
    from iclgd_lens.analyses import weight_properties as wp
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    result = wp.run("tiny-llama-icl")
    header("weight-properties", result, started)
    _weight_table(result.table)
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=64,
        )
    )
    print(
        "\nrandom-init LLaMA (d_model 32, 2 layers, 4 heads, 2 kv heads, seed 0; "
        "the shape of tests/test_weight_properties.py):\n"
    )
    _weight_table(wp.run(model=random_model).table)


# ---- conflict-probe ------------------------------------------------------------------------
def _conflict_table(result) -> None:
    from iclgd_lens.analyses.conflict_probe import summary

    s = summary(result.table).set_index(["metric", "stage", "layer"])["mean"]
    cfg = result.config
    print(f"k = {cfg['k']}, {cfg['n_facts']} facts, run time {cfg['run_time_s']} s")
    for metric in ("fact_accuracy", "context_wins", "weights_win", "other"):
        print(f"  {metric}: {s[(metric, 'before', -1)]:.2f} -> {s[(metric, 'after', -1)]:.2f}")
    print(
        f"  fine-tuning loss (mean over the batches of the first -> last step): {cfg['ft_loss_first']:.1e} "
        f"-> {cfg['ft_loss_last']:.1e}"
    )
    layers = sorted(s.xs(("attn_update_norm", "before"), level=("metric", "stage")).index)
    for stage in ("before", "after"):
        print(
            f"  |h_conflict - h_ZSL| {stage}, layers {'/'.join(map(str, layers))}: "
            + "/".join(f"{s[('attn_update_norm', stage, l)]:.2f}" for l in layers)
        )
    print(
        "  cos(update after, update before): "
        + "/".join(f"{s[('attn_update_cos', 'after', l)]:.2f}" for l in layers)
    )


def conflict_probe() -> None:
    from iclgd_lens.analyses.conflict_probe import run

    for k in (4, 16):  # the corpus facts: the floor (docs/studies/conflict-probe.md)
        started = time.time()
        result = run("tiny-llama-icl", "corpus", k=k, progress=False)
        header(f"conflict-probe, corpus facts (k = {k})", result, started)
        _conflict_table(result)
    # the random model of tests/test_studies.py::test_conflict_probe_fine_tuning_changes_outcomes
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_bridge, tiny_tokenizer  # noqa: E402  (the tests' tiny random LLaMA)

    facts = [(f"w{i}", "ABCD"[i % 4], "ABCD"[(i + 1) % 4]) for i in range(8)]
    started = time.time()
    result = run(
        tiny_bridge(tokenizer=tiny_tokenizer(), n_layers=2),
        facts,
        template="{text} :",
        k=3,
        ft_lr=1e-2,
        ft_epochs=40,
        progress=False,
    )
    header(
        "conflict-probe on the tests' random tiny LLaMA (8 facts w_i : A..D, k = 3, ft_lr 1e-2, 40 epochs)",
        result,
        started,
    )
    _conflict_table(result)


# ---- icl-vs-iwl ----------------------------------------------------------------------------
def icl_vs_iwl() -> None:
    from iclgd_lens.analyses import icl_vs_iwl as study

    started = time.time()
    result = study.run()
    header("icl-vs-iwl", result, started)


STUDIES = {
    "k-sweep": k_sweep,
    "order-sensitivity": order_sensitivity,
    "gd-trajectories": gd_trajectories,
    "weight-properties": weight_properties,
    "conflict-probe": conflict_probe,
    "icl-vs-iwl": icl_vs_iwl,
}


def main(study: str = typer.Argument(..., help="a study name or 'all'"), threads: int = 1) -> None:
    """Print the figures of one study page (or all)."""
    if study != "all" and study not in STUDIES:
        raise typer.BadParameter(f"choose one of: all, {', '.join(STUDIES)}")
    torch.set_num_threads(threads)
    pd.set_option("display.width", 200)
    for name in STUDIES if study == "all" else [study]:
        STUDIES[name]()


if __name__ == "__main__":
    typer.run(main)
