"""Where `compare`'s time goes on the mid-size random LLaMA of benchmarks/engine.py (the figures of
docs/performance.md, "Where the engine's time goes"): dense SGD deltas against low-rank ones.

    python benchmarks/engine_profile.py [--reps 2] [--threads 1] [--n-episodes 8]

The dense path is the same GD engine with `gd.LOW_RANK_LIMIT = 0` (every delta multiplied out from
the first step: what `train_deltas` did before deltas became low-rank); low-rank is the default
(`LOW_RANK_LIMIT = 1`). Each repetition runs both, alternating, on the same episodes: `compare`
on L8 d512 h8 (k = 16, 32 queries per demo set, SGD lr 1e-2, the engine benchmark's probes, no
baselines), with `train_deltas` timed inside `compare`. Prints wall times per repetition and
whether the two paths give the same table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/engine.py, before torch loads

import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import BENCH_PROBES, MID, bench_task, random_llama  # noqa: E402

from iclgd_lens.engine import compare as comparison  # noqa: E402
from iclgd_lens.engine.gd import GDConfig  # noqa: E402
from iclgd_lens.engine.gd import train as gd  # noqa: E402  (LOW_RANK_LIMIT is read there)

KEY = ["metric", "comparison", "layer", "head", "episode", "query"]


def timed_compare(
    bridge, task, limit: float, n_episodes: int, k: int, n_queries: int
) -> tuple[float, float, object]:
    """(compare seconds, train_deltas seconds, Results) with gd.LOW_RANK_LIMIT = limit."""
    spent = []
    original = comparison.train_deltas

    def train_deltas(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return out

    saved = gd.LOW_RANK_LIMIT
    gd.LOW_RANK_LIMIT, comparison.train_deltas = limit, train_deltas
    try:
        start = time.perf_counter()
        res = comparison.compare(
            bridge,
            task,
            gd=GDConfig.dai(lr=1e-2),
            k=k,
            n_episodes=n_episodes,
            n_queries=n_queries,
            seed=0,
            baselines=False,
            artifacts=False,
            probes=BENCH_PROBES,
            progress=False,
        )
        total = time.perf_counter() - start
    finally:
        gd.LOW_RANK_LIMIT, comparison.train_deltas = saved, original
    return total, sum(spent), res


def main(reps: int = 2, threads: int = 1, n_episodes: int = 8, k: int = 16, n_queries: int = 32) -> None:
    """Print the timing table."""
    torch.set_num_threads(threads)
    bridge, task = random_llama(MID), bench_task()
    print(
        f"# {MID.label()}, k={k}, {n_episodes} demo sets x {n_queries} queries, {threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    timed_compare(bridge, task, 1.0, 1, k, 2)  # warm-up
    rows, tables = {"dense": [], "low-rank": []}, {}
    for _ in range(reps):
        for name, limit in (("dense", 0.0), ("low-rank", 1.0)):
            total, train, res = timed_compare(bridge, task, limit, n_episodes, k, n_queries)
            rows[name].append((total, train))
            tables[name] = res.table
    print(f"# load average after: {os.getloadavg()[0]:.1f}\n")
    print(
        "| GD deltas | `compare` | of which `train_deltas` | rest (encoding, ZSL/ICL/GD recording, metrics) |"
    )
    print("|---|---|---|---|")
    for name, values in rows.items():
        totals, trains = [t for t, _ in values], [g for _, g in values]
        rests = [t - g for t, g in values]
        share = [g / t for t, g in values]
        print(
            f"| {name} | {min(totals):.1f}-{max(totals):.1f} s | {min(trains):.1f}-{max(trains):.1f} s "
            f"({100 * min(share):.0f}-{100 * max(share):.0f}%) | {min(rests):.1f}-{max(rests):.1f} s |"
        )
    a = tables["dense"].set_index(KEY)["value"]
    b = tables["low-rank"].set_index(KEY)["value"]
    same_rows = a.index.sort_values().equals(b.index.sort_values())
    diff = (a - b.reindex(a.index)).abs()
    worst = diff.idxmax()
    print(
        f"\nthe two paths' tables: {len(a):,} rows, same rows: {same_rows}, "
        f"largest difference {diff.max():.1e} ({worst[0]}, layer {worst[2]})"
    )


if __name__ == "__main__":
    typer.run(main)
