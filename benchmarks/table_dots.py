"""What `metrics.query_key_dots` (one dot product per distinct key row, so that equal keys give
bitwise-equal values for Kendall's exact ties) costs against the plain matmul it replaces, at the
shapes one group of rows has in the default compare on LLaMa-2-7B (32 layers, 32 heads of 128,
SST-2 at k = 32: about 913 prefix tokens, of which about 880 are GD's training tokens), beside the
Kendall tau-b that consumes the values (`metrics.kendall_tau_b`, the same rows).

Random inputs of those shapes in float32 on this machine's CPU (or `--device cuda`); every side is
timed in one process, alternating, median of `--reps`; a warm-up call of each first. Prints seconds
and the ratio of query_key_dots to the matmul, for the per-head variant (one unique per layer and
head) and Dai's Kendall (one per layer).

    python benchmarks/table_dots.py [--rows 6] [--threads 1] [--reps 3] [--device cpu]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/engine.py, before torch loads

import statistics
import time
from typing import Callable

import torch
import typer

from iclgd_lens.engine import metrics

LAYERS, HEADS, D_HEAD = 32, 32, 128  # LLaMa-2-7B
PREFIX, TRAIN = 913, 880  # SST-2, k = 32: prefix tokens of one demo set; GD's training tokens


def seconds(fn: Callable[[], torch.Tensor], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(
    rows: int = typer.Option(
        6, help="Query rows of the group (compare's default: 6 queries of one demo set)."
    ),
    threads: int = typer.Option(1),
    reps: int = typer.Option(3),
    device: str = typer.Option("cpu"),
) -> None:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    # per-head: GD's query [L, H, B, d] against the prefix's queries [L, H, P, d]
    q_head = torch.randn(LAYERS, HEADS, rows, D_HEAD, generator=gen).to(device)
    k_head = torch.randn(LAYERS, HEADS, PREFIX, D_HEAD, generator=gen).to(device)
    # Dai's: GD's query [L, B, H*d] against the training tokens' queries [L, T, H*d]
    q_dai = torch.randn(LAYERS, rows, HEADS * D_HEAD, generator=gen).to(device)
    k_dai = torch.randn(LAYERS, TRAIN, HEADS * D_HEAD, generator=gen).to(device)
    sides = {
        "per-head query_key_dots": lambda: metrics.query_key_dots(q_head, k_head),
        "per-head matmul": lambda: q_head @ k_head.transpose(-1, -2),
        "per-head kendall_tau_b": lambda: metrics.kendall_tau_b(
            q_head @ k_head.transpose(-1, -2), q_head @ k_head.transpose(-1, -2)
        ),
        "Dai query_key_dots (softmax)": lambda: metrics.query_key_dots(q_dai, k_dai, softmax=True),
        "Dai matmul + softmax": lambda: torch.softmax(q_dai @ k_dai.transpose(-1, -2), -1),
        "Dai kendall_tau_b": lambda: metrics.kendall_tau_b(
            q_dai @ k_dai.transpose(-1, -2), q_dai @ k_dai.transpose(-1, -2)
        ),
    }
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            times[name].append(seconds(fn, device))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"# LLaMa-2-7B shapes: L={LAYERS} H={HEADS} d_head={D_HEAD} prefix={PREFIX} train={TRAIN} "
        f"rows={rows}; {device}, {threads} thread(s), median of {reps}, alternating"
    )
    for name, value in median.items():
        print(f"{name:32s} {value:8.3f} s")
    per_head = median["per-head query_key_dots"] / median["per-head matmul"]
    dai = median["Dai query_key_dots (softmax)"] / median["Dai matmul + softmax"]
    print(f"per-head: query_key_dots / matmul {per_head:.1f}x; Dai: {dai:.1f}x")


if __name__ == "__main__":
    typer.run(main)
