"""Sweeps at research scale: a grid of comparisons (models x tasks x k x GD settings x seeds),
each cell computed once into a content-addressed store, in this process, in submitit jobs or in
Ray tasks (docs/sweeps.md).

    from iclgd_lens.sweep import SweepSpec, run_sweep, load_spec
    spec = SweepSpec(models=["tiny-llama-icl", "tiny-llama-iclobj"], k=[1, 2, 4], seeds=[0, 1])
    run_sweep(spec, "iclgd-store")            # rerun: only the missing cells are computed
"""

from iclgd_lens.sweep.run import Planned, SweepSummary, plan, run_cell, run_sweep, status_rows
from iclgd_lens.sweep.spec import Cell, GDRef, SweepSpec, TaskRef, cells, load_spec, preset_names
from iclgd_lens.sweep.store import Store

__all__ = [
    "Cell",
    "GDRef",
    "Planned",
    "Store",
    "SweepSpec",
    "SweepSummary",
    "TaskRef",
    "cells",
    "load_spec",
    "plan",
    "preset_names",
    "run_cell",
    "run_sweep",
    "status_rows",
]
