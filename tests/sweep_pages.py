"""A tiny sweep store and its report, for the browser test (tests/test_browser.py) and
tests/test_sweep_report.py: `make_sweep_report(tmp_path)` returns the report's index.html."""

from __future__ import annotations

from pathlib import Path

from iclgd_lens.report.sweep import render_sweep
from iclgd_lens.sweep import SweepSpec, run_sweep


def tiny_sweep_spec(**changes) -> SweepSpec:
    """Both embedded models x k = 1, 2 at lr 3e-2, and lr 1e-2 beside it for tiny-llama-icl at
    k = 2: 5 cells of 2 episodes of 2 queries, without the per-layer pages' drawables."""
    spec = SweepSpec(
        name="pages",
        models=["tiny-llama-icl", "tiny-llama-iclobj"],
        k=[1, 2],
        gd=[{"preset": "dai", "lr": [1e-2, 3e-2]}],
        n_episodes=2,
        n_queries=2,
        baselines=["random", "random_update"],
        exclude=[{"model": "tiny-llama-iclobj", "gd": "dai lr=0.01"}, {"k": 1, "gd": "dai lr=0.01"}],
        artifacts=False,
    )
    return spec.with_settings(**changes) if changes else spec


def make_sweep_report(tmp_path: Path, **changes) -> Path:
    """Run the tiny sweep into tmp_path/store and render it into tmp_path/sweep-report."""
    store = Path(tmp_path) / "store"
    run_sweep(tiny_sweep_spec(**changes), store)
    return render_sweep(store, Path(tmp_path) / "sweep-report")
