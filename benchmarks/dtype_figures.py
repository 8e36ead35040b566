"""Does bf16 change the numbers? (docs/models.md, "bf16 and the numbers")

The default compare on tiny-llama-icl and the default task (k = 8, 4 demo sets x 8 queries asked
for, of which the default task gives 6; Dai's GD, every baseline) once with the model in float32
and once in bfloat16, both on the CPU.
Prints, per metric and comparison, the per-layer means (head -1, over episodes) of both runs and
the largest difference between them over the layers. Run: python benchmarks/dtype_figures.py
"""

from __future__ import annotations

import pandas as pd
import torch

from iclgd_lens import GDConfig, compare, load_model

METRICS = ("simaou", "simaou_norm", "simam_delta", "dw_cos", "kendall_token")
KEY = ["metric", "comparison", "layer"]


def layer_means(dtype: str) -> pd.Series:
    """Per-layer means of the whole-layer rows (head -1) of one default compare, by KEY."""
    model = load_model(dtype=dtype)
    results = compare(
        model, gd=GDConfig.dai(), k=8, n_episodes=4, n_queries=8, progress=False, artifacts=False
    )
    summary = results.summary()
    summary = summary[(summary["head"] == -1) & summary["metric"].isin(METRICS)]
    return summary.set_index(KEY)["mean"]


def main() -> None:
    torch.set_num_threads(1)
    both = pd.concat({"float32": layer_means("float32"), "bfloat16": layer_means("bfloat16")}, axis=1)
    print(
        "| metric | comparison | per-layer means, float32 | per-layer means, bfloat16 | largest difference |"
    )
    print("|---|---|---|---|---|")
    for (metric, comparison), rows in both.groupby(level=["metric", "comparison"], sort=True):
        fmt = lambda col: " ".join("nan" if pd.isna(v) else f"{v:+.3f}" for v in rows[col])
        diff = (rows["float32"] - rows["bfloat16"]).abs().max()
        print(f"| {metric} | {comparison} | {fmt('float32')} | {fmt('bfloat16')} | {diff:.3f} |")


if __name__ == "__main__":
    main()
