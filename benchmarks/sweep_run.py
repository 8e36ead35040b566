"""A measured local sweep: the same grid through every executor, the rerun, and the store queried.

    python benchmarks/sweep_run.py                  # 2 models x k = 1, 2, 4, 8 x 2 seeds (16 cells)
    python benchmarks/sweep_run.py --quick          # 2 x 2 x 2 (8 cells), in-process only
    python benchmarks/sweep_run.py --executors local,submitit,ray --json out.json

Each executor runs the grid into its own empty store: in this process (each model loaded once),
as submitit jobs on this machine (`cluster="local"`, one subprocess per cell, 2 at a time on 2
cores) and on a local Ray instance (2 CPUs). Then: the in-process rerun (every cell found,
nothing computed), whether every store equals the in-process one bitwise (every file of every
cell), the store's size, and a DuckDB query over all cells. Wall-clock times are of this
machine at the time (the load average is printed beside them); the ratios compare runs made
one after the other in this script. docs/sweeps.md quotes this script's output.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def store_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "cells").rglob("*")) if p.is_file()
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 2 x 2 cells, in-process only")
    parser.add_argument("--executors", default=None, help="comma list of local, submitit, ray")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from iclgd_lens.sweep import SweepSpec, run_sweep

    ks = [1, 2] if args.quick else [1, 2, 4, 8]
    executors = (args.executors or ("local" if args.quick else "local,submitit,ray")).split(",")
    spec = SweepSpec(
        name="benchmark",
        models=["tiny-llama-icl", "tiny-llama-iclobj"],
        k=ks,
        seeds=[0, 1],
        n_episodes=4,
        n_queries=4,
        threads=1,
    )
    options = {
        "local": {},
        "submitit": {"cluster": "local", "max_parallel": 2, "timeout_min": 30},
        "ray": {"num_cpus": 2},
    }
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    out: dict = {
        "cells": len(ks) * 4,
        "grid": f"2 models x k={ks} x 2 seeds, 4 episodes x 4 queries, every baseline, 1 thread per cell",
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "runs": {},
    }
    try:
        for name in executors:
            started = time.perf_counter()
            summary = run_sweep(spec, work / name, executor=name, **options[name])
            wall = time.perf_counter() - started
            out["runs"][name] = {
                "wall_s": round(wall, 1),
                "computed": len(summary.computed),
                "failed": len(summary.failed),
            }
            print(
                f"{name:9s} {wall:7.1f} s  {len(summary.computed)} computed, {len(summary.failed)} failed",
                flush=True,
            )
        reference = store_files(work / executors[0])
        for name in executors[1:]:
            out["runs"][name]["same_store_bitwise"] = store_files(work / name) == reference
        started = time.perf_counter()
        rerun = run_sweep(spec, work / executors[0])
        out["rerun"] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "computed": len(rerun.computed),
            "reused": len(rerun.reused),
        }
        size = sum(p.stat().st_size for p in (work / executors[0] / "cells").rglob("*") if p.is_file())
        out["store_mb"] = round(size / 2**20, 1)

        import duckdb

        started = time.perf_counter()
        files = f"{work / executors[0]}/cells/*/results.parquet"
        query = (
            f"SELECT model, k, avg(value) AS simaou FROM read_parquet('{files}') WHERE metric = 'simaou' "
            "AND comparison = 'icl~gd' AND head = -1 GROUP BY model, k ORDER BY model, k"
        )
        frame = duckdb.sql(query).df()
        out["duckdb"] = {
            "wall_s": round(time.perf_counter() - started, 3),
            "rows": frame.round(4).to_dict("records"),
        }
        out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local = out["runs"][executors[0]]["wall_s"]
    rerun = out["rerun"]
    print(f"rerun     {rerun['wall_s']:7.2f} s  {rerun['computed']} computed, {rerun['reused']} reused")
    for name in executors[1:]:
        run = out["runs"][name]
        same = run["same_store_bitwise"]
        print(f"{name}: {run['wall_s'] / local:.1f}x the in-process time; same store bitwise: {same}")
    duck = out["duckdb"]["wall_s"]
    print(f"store {out['store_mb']} MB for {out['cells']} cells; DuckDB query over all cells {duck} s")
    print("mean SimAOU (ICL~GD, layers, episodes, seeds pooled) by model and k:")
    for row in out["duckdb"]["rows"]:
        print(f"  {row['model']:18s} k={row['k']}: {row['simaou']:.4f}")
    before, after = out["load_average_before"], out["load_average_after"]
    print(f"load average before {before}, after {after} ({out['cpus']} cores)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
