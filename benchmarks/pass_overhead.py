"""Two measurements behind docs/performance.md's "Why the default compare is not 3x faster than C":

- the cost of one pass through TransformerLens' bridge against plain HF transformers on the same
  weights and rows (8 rows x 4 tokens, a GD step's shape): no-grad forward, and forward + backward
  from the residual stream (the graph a GD step builds), median of `--reps` timings each;
- the default compare at 64 and at 128 rows per pass (`batch_size`), alternating in one process,
  medians of `--runs` runs each (the default is 128).

    python benchmarks/pass_overhead.py [--threads 1] [--reps 30] [--runs 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/engine.py, before torch loads

import statistics
import sys
import time
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import MID, bench_task, random_llama, tiny_llama_icl, warm_up  # noqa: E402
from machine import pass_times  # noqa: E402

from iclgd_lens.engine.compare import compare  # noqa: E402
from iclgd_lens.engine.gd import GDConfig  # noqa: E402


def batch_size_times(bridge, task, runs: int) -> dict[int, list[float]]:
    """Seconds of the default compare (k = 16, 8 demo sets x 32 queries) at 64 and 128 rows per pass."""
    times: dict[int, list[float]] = {64: [], 128: []}
    for _ in range(runs):
        for size in times:
            start = time.perf_counter()
            compare(
                bridge,
                task,
                gd=GDConfig.dai(lr=1e-2),
                k=16,
                n_episodes=8,
                n_queries=32,
                seed=0,
                batch_size=size,
                progress=False,
            )
            times[size].append(time.perf_counter() - start)
    return times


def main(threads: int = typer.Option(1), reps: int = typer.Option(30), runs: int = typer.Option(3)) -> None:
    torch.set_num_threads(threads)
    task = bench_task()
    tiny, _ = tiny_llama_icl()
    print(f"# {threads} thread(s); passes: median of {reps}; default compare: median of {runs}, alternating")
    for label, bridge in (("tiny-llama-icl", tiny), (f"random {MID.label()}", random_llama(MID))):
        warm_up(bridge, task)
        passes = pass_times(bridge, reps)
        print(f"\n## {label}: one pass of 8 x 4 tokens")
        for name, ms in passes.items():
            print(f"{name:<34} {ms:7.2f}")
        sizes = batch_size_times(bridge, task, runs)
        med = {size: statistics.median(t) for size, t in sizes.items()}
        print(f"## {label}: default compare, rows per pass")
        for size, t in sizes.items():
            print(f"batch_size {size:<4} median {med[size]:6.2f} s  ({', '.join(f'{x:.2f}' for x in t)})")
        print(f"128 / 64: {med[128] / med[64]:.3f}")


if __name__ == "__main__":
    typer.run(main)
