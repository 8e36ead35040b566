"""Print the tables of docs/studies/iclobj-vs-emergent.md: the study on the two shipped models,
and the sweep of GD's learning rate on the same episodes.

    python benchmarks/iclobj_vs_emergent.py [--threads 1]

The study table: mean [95% CI] per model of each (metric, comparison) — layer-level metrics
averaged over layers per query first (`study.layer_mean`) — and the paired p over episodes from
the study's own `differences`. The sweep: per model and Dai-preset lr, GD accuracy, KL(gd, zsl)
and SimAOU icl~gd.
"""

from __future__ import annotations

import time

import torch
import typer
from iclgd_lens.analyses.iclobj_vs_emergent import DEFAULT_MODELS, differences, run

from iclgd_lens.engine.compare import compare
from iclgd_lens.engine.gd import GDConfig
from iclgd_lens.study import as_bridge, layer_mean
from iclgd_lens.tasks.mapping import default_task

ROWS = (
    ("accuracy", "zsl"),
    ("accuracy", "icl"),
    ("accuracy", "gd"),
    ("simaou", "icl~gd"),
    ("simaou", "icl~random_update"),
    ("simaou", "icl~random"),
    ("simaou", "icl~icl_perm"),
    ("simaou_norm", "icl~gd"),
    ("simam_delta", "icl~gd"),
    ("dw_cos", "icl~gd"),
    ("token_overlap", "icl~gd"),
    ("kl", "icl~gd"),
    ("kl", "gd~zsl"),
)
SWEEP_LRS = (3e-2, 1e-1, 3e-1, 1.0)


def study_table() -> None:
    """The study with its defaults, as a markdown table, then SimAOU icl~gd per layer."""
    start = time.time()
    result = run(progress=False)
    names = result.config["models"]
    n_ep = result.table.groupby("model").episode.nunique().min()
    print(
        f"study: {names[0]} vs {names[1]}, {time.time() - start:.1f}s; {n_ep} episodes per model; "
        "intervals over episode means\n"
    )
    means = layer_mean(result.table).set_index(["model", "metric", "comparison"])
    diffs = differences(result.table, names)
    p_values = {(r.metric, r.comparison): r.p_value for r in diffs[diffs.layer == -1].itertuples()}
    print(
        f"| metric (comparison) | {names[0]} mean [95% CI] | {names[1]} mean [95% CI] | paired p (episodes) |"
    )
    print("|---|---|---|---|")
    for metric, comparison in ROWS:
        cells = []
        for name in names:
            row = means.loc[(name, metric, comparison)]
            cells.append(f"{row['mean']:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] (n={int(row.n)})")
        p = p_values.get((metric, comparison))
        print(f"| {metric} ({comparison}) | {cells[0]} | {cells[1]} | {'' if p is None else f'{p:.2g}'} |")
    print("\nSimAOU icl~gd per layer:")
    for r in diffs[(diffs.metric == "simaou") & (diffs.layer >= 0)].itertuples():
        print(f"  layer {r.layer}: {r.mean_a:.3f} vs {r.mean_b:.3f} (p = {r.p_value:.2g})")


def lr_sweep() -> None:
    """GD accuracy, KL(gd, zsl) and SimAOU icl~gd per model and lr (the study's episodes)."""
    print("\n| model | lr | GD accuracy | KL(gd, zsl) | SimAOU icl~gd |")
    print("|---|---|---|---|---|")
    for name in DEFAULT_MODELS:
        bridge = as_bridge(name)
        for lr in SWEEP_LRS:
            res = compare(
                bridge,
                default_task(),
                gd=GDConfig.dai(lr=lr),
                k=8,
                n_episodes=4,
                n_queries=16,
                seed=0,
                baselines=(),
                progress=False,
                artifacts=False,
            )
            means = layer_mean(res.table).set_index(["metric", "comparison"])["mean"]
            print(
                f"| {name} | {lr:g} | {means[('accuracy', 'gd')]:.3f} | {means[('kl', 'gd~zsl')]:.3f} | "
                f"{means[('simaou', 'icl~gd')]:.3f} |"
            )


def main(threads: int = 1) -> None:
    """Print both tables."""
    torch.set_num_threads(threads)
    study_table()
    lr_sweep()


if __name__ == "__main__":
    typer.run(main)
