"""Print every number of docs/studies/conflict-probe.md: the study `conflict-probe` on both
embedded models, on one CPU thread, with the corpus's "item is category" facts (the floor) and
with mapping-format "item = label" facts (the condition with headroom), before and after GD
fine-tuning on the facts.

    python benchmarks/conflict_figures.py            # ~3 min

Mapping facts: seeds 0-4 (each seed draws its own category -> label map, counterfact derangement
and demonstration placement), fine-tuning for the default 10 epochs and for 40. Rates are the
mean over seeds of each seed's rate over its 36 facts, with a 95% t-interval over the 5 seeds
(clipped to the metric's range, `conflict_probe.RANGES`);
the per-fact interval of seed 0 is in that run's findings. Corpus facts: seed 0, k = 4 and 16.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from iclgd_lens.analyses.conflict_probe import RANGES, run, summary

from iclgd_lens import stats

MODELS = ("tiny-llama-icl", "tiny-llama-iclobj")
RATES = ("fact_accuracy", "context_wins", "weights_win", "other")


def ci(values, metric: str) -> str:
    """Mean [95% t-interval over seeds, clipped to the metric's range] of one value per seed."""
    i = stats.t_interval(values, bounds=RANGES[metric])
    return f"{i.mean:.2f}" if np.isnan(i.ci_low) else f"{i.mean:.2f} [{i.ci_low:.2f}, {i.ci_high:.2f}]"


def model_level(result) -> dict:
    s = summary(result.table).set_index(["metric", "stage", "layer"])["mean"]
    return s


def floor() -> None:
    print('## corpus facts "item is category" (seed 0)\n')
    print(
        "| model | k | fact accuracy before → after | context wins before → after "
        "| weights win before → after | run time |"
    )
    print("|---|---|---|---|---|---|")
    for model in MODELS:
        for k in (4, 16):
            started = time.time()
            r = run(model, "corpus", k=k, progress=False)
            s = model_level(r)
            cell = lambda m: f"{s[(m, 'before', -1)]:.2f} → {s[(m, 'after', -1)]:.2f}"
            print(
                f"| {model} | {k} | {cell('fact_accuracy')} | {cell('context_wins')} | {cell('weights_win')} "
                f"| {time.time() - started:.1f} s |"
            )
    print()


def mapping() -> None:
    print('## mapping facts "item = label" (k = 4, seeds 0-4)\n')
    for model in MODELS:
        for epochs in (10, 40):
            started = time.time()
            per_seed = [
                model_level(run(model, "mapping", k=4, ft_epochs=epochs, seed=seed, progress=False))
                for seed in range(5)
            ]
            if epochs == 10:
                print(
                    f"findings of {model}, seed 0, {epochs} epochs:\n"
                    + run(model, "mapping", k=4, ft_epochs=epochs, seed=0, progress=False).findings
                    + "\n"
                )
            print(f"### {model}, fine-tuning {epochs} epochs ({time.time() - started:.1f} s for 5 seeds)\n")
            print("| metric | before | after |")
            print("|---|---|---|")
            for m in RATES:
                print(
                    f"| {m} | {ci([s[(m, 'before', -1)] for s in per_seed], m)} "
                    f"| {ci([s[(m, 'after', -1)] for s in per_seed], m)} |"
                )
            layers = sorted(
                l for (m, st, l) in per_seed[0].index if m == "attn_update_norm" and st == "before"
            )
            for stage in ("before", "after"):
                print(
                    f"| ‖h_conflict − h_ZSL‖ {stage}, layers {'/'.join(map(str, layers))} | "
                    + " / ".join(
                        ci([s[("attn_update_norm", stage, l)] for s in per_seed], "attn_update_norm")
                        for l in layers
                    )
                    + " | |"
                )
            print(
                "| cos(update after, update before), layers | "
                + " / ".join(
                    ci([s[("attn_update_cos", "after", l)] for s in per_seed], "attn_update_cos")
                    for l in layers
                )
                + " | |"
            )
            print()


if __name__ == "__main__":
    torch.set_num_threads(1)
    floor()
    mapping()
