"""Print how much compare()'s numbers move with `batch_size` alone (docs/performance.md, "Batch
size and rounding"): the default comparison on the embedded model, run at several batch sizes,
and for each against the largest, per metric and comparison the largest absolute difference of
one row between the two tables.

The prompts, episodes, GD and draws are the same; only the shape of the batched passes differs,
and a float32 matmul kernel may sum in another order for another shape, so the rows agree to
rounding, not bitwise. Metrics of small differences (SimAM-delta, the random update's rows)
show the largest spread. `max_memory` picks a smaller batch size when the budget asks for one.

    python benchmarks/batch_shape.py [--sizes 1 --sizes 3 ...] [--threads 1]
"""

from __future__ import annotations

import pandas as pd
import torch
import typer

from iclgd_lens import compare, load_model

KEY = ["metric", "comparison", "layer", "head", "episode", "query"]


def main(sizes: list[int] = typer.Option([1, 3, 8, 128]), threads: int = 1, top: int = 6) -> None:
    """Every batch size in `sizes` against the largest."""
    torch.set_num_threads(threads)
    model = load_model()
    tables = {b: compare(model, batch_size=b, progress=False, artifacts=False).table for b in sorted(sizes)}
    largest = max(sizes)
    print(f"compare() on the embedded model, default settings, {threads} thread(s), vs batch_size {largest}:")
    for size in sorted(set(sizes) - {largest}):
        merged = tables[size].merge(tables[largest], on=KEY, suffixes=("_small", "_large"))
        assert len(merged) == len(tables[size]) == len(tables[largest]), "the two tables have other rows"
        merged["diff"] = (merged["value_small"] - merged["value_large"]).abs()
        worst = merged.groupby(["metric", "comparison"])["diff"].max().sort_values(ascending=False)
        print(
            f"\nbatch_size {size}: {len(merged)} rows, {int((merged['diff'] > 0).sum())} differ, "
            f"largest |difference| {merged['diff'].max():.2e}"
        )
        if worst.iloc[0] > 0:
            print(f"largest |difference| of one row, per metric and comparison (top {top}):")
            with pd.option_context("display.float_format", "{:.2e}".format):
                print(worst.head(top).reset_index().to_string(index=False))
            headline = worst.drop([i for i in worst.index if "random_update" in i[1]], errors="ignore")
            print(f"without the random update's rows: {headline.iloc[0]:.2e} ({' '.join(headline.index[0])})")


if __name__ == "__main__":
    typer.run(main)
