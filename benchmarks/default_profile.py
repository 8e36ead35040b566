"""Where the default compare()'s time goes on the mid-size random LLaMA (docs/performance.md, "Why
the default compare is not 3x faster than C"): cProfile of one default compare (every probe and
baseline, artifacts; k = 16, 8 demo sets x 32 queries), as shares of the whole of the functions
named below (cumulative time; they overlap where one calls another).

    python benchmarks/default_profile.py [--threads 1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/engine.py, before torch loads

import cProfile
import pstats
import sys
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import MID, Config, bench_task, engine_compare, random_llama, warm_up  # noqa: E402

PARTS = {
    "train_deltas (all calls)": ("gd/train.py", "train_deltas"),
    "episode_table (metrics, rows)": ("engine/table.py", "episode_table"),
    "  per-head Kendall": ("engine/table.py", "_kendall_per_head_rows"),
    "  Dai's Kendall": ("engine/table.py", "_dai_kendall_rows"),
    "  dW_GD as factors (dw_difference_factors)": ("engine/metrics.py", "dw_difference_factors"),
    "  dW cosines from the factors": ("engine/metrics.py", "factored_matrix_cosine"),
    "  dW q from the factors (and the dual form)": ("engine/metrics.py", "dual_form_update"),
    "ICL passes (prefix + queries)": ("engine/compare.py", "_icl_all"),
    "query-alone passes (ZSL, GD, random update)": ("engine/record.py", "run_batched"),
    "untrained weights drawn in place (and put back)": ("engine/baselines.py", "untrained_in_place"),
    "  query rows' keys and values (SharedPrefixLayer.update)": ("engine/prefix_cache.py", "update"),
    "example artifacts": ("engine/artifacts.py", "example_artifacts"),
    "torch linear (all matmuls of nn.Linear)": ("~", "<built-in method torch._C._nn.linear>"),
    "bridge component calls (TransformerLens wrappers)": ("generalized_components/base.py", "__call__"),
}


def main(threads: int = typer.Option(1)) -> None:
    torch.set_num_threads(threads)
    model, task = random_llama(MID), bench_task()
    warm_up(model, task)
    profile = cProfile.Profile()
    profile.runcall(engine_compare, model, task, Config(k=16, n_episodes=8, n_queries=32), None, True, True)
    stats = pstats.Stats(profile).stats
    total = max(ct for (_, _, _, ct, _) in stats.values())
    print(
        f"# default compare, random {MID.label()}, k=16, 8 x 32, {threads} thread(s): "
        f"{total:.1f} s in cProfile"
    )
    for label, (file, name) in PARTS.items():
        # the outermost entry of that name (a method and the one it delegates to share names)
        entries = [v for (f, _, n), v in stats.items() if n == name and (file == "~" or f.endswith(file))]
        cum, calls = max(((v[3], v[1]) for v in entries), default=(0.0, 0))
        print(f"{label:<52} {cum:7.2f} s  {100 * cum / total:5.1f}%  ({calls} calls)")


if __name__ == "__main__":
    typer.run(main)
