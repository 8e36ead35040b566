"""Run a sweep: plan its cells against the store, then compute the missing ones with an executor.

    from iclgd_lens.sweep import SweepSpec, run_sweep
    summary = run_sweep(SweepSpec(models=["tiny-llama-icl"], k=[1, 2, 4]), "iclgd-store")

`plan` resolves every cell's canonical configuration and key (identity.py) and its status in
the store; `run_cell` computes one cell in this process and writes it atomically (store.py);
the executors (executors.py) call `run_cell` in this process, in submitit jobs or in Ray tasks.
Every job sets torch's thread count from the spec first, so a cell's numbers do not depend on
which executor ran it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from iclgd_lens import interrupts
from iclgd_lens.errors import IclgdError
from iclgd_lens.sweep.identity import Resolver, cell_key, load_hash_cache, save_hash_cache, task_identity
from iclgd_lens.sweep.spec import Cell, SweepSpec, cells
from iclgd_lens.sweep.store import TIMING_KEYS, Store

EXECUTORS = ("local", "submitit", "ray")


@dataclass
class Planned:
    """A cell with its canonical configuration, its key and its status in the store."""

    cell: Cell
    config: dict
    key: str
    status: str

    @property
    def labels(self) -> dict:
        return self.cell.labels


@dataclass
class SweepSummary:
    """What one `run_sweep` did: keys computed now, found done, failed (key -> error)."""

    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    store: str = ""

    def line(self) -> str:
        return (
            f"{len(self.computed)} computed, {len(self.reused)} already in the store, "
            f"{len(self.failed)} failed; store {self.store}"
        )


def plan(spec: SweepSpec, store: Store | str | os.PathLike, *, strict: bool = True) -> list[Planned]:
    """Every cell of `spec` with its key and status (done / missing / failed) in `store`.
    `strict=False` (listings) lets a hub model that is not downloaded yet through with a
    placeholder fingerprint; running needs the real one. Planning writes nothing: it reads the
    store's saved file hashes (fingerprints.json) when there, and `run_sweep` saves them."""
    spec.check()  # a spec made in Python is checked like one read from a file
    store = store if isinstance(store, Store) else Store(store)
    cache = store.root / "fingerprints.json"
    if cache.is_file():
        load_hash_cache(cache)
    resolver = Resolver(strict)
    out = []
    for cell in cells(spec):
        config = resolver.config(cell)
        key = cell_key(config)
        out.append(Planned(cell, config, key, store.status(key)))
    return out


# ---- one cell ------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """torch's intra-op threads (a cell's last bits can depend on it)."""
    import torch

    torch.set_num_threads(int(n))


def load_cell_model(cell: Cell):
    from iclgd_lens.models import load_model

    return load_model(cell.model, device=cell.setting("device"), dtype=cell.setting("dtype", "float32"))


def run_cell(store: Store | str | os.PathLike, planned: Planned, model=None) -> str:
    """Compute one cell and write it into the store; returns "done", "exists" (already there)
    or "failed" (its one-line error recorded in STORE/failed/). `model`: the cell's model,
    already loaded (the in-process executor loads each model once); else it is loaded here.
    KeyboardInterrupt (SIGINT, or SIGTERM turned into it) removes the cell's temporary folder
    and propagates."""
    store = store if isinstance(store, Store) else Store(store)
    if store.status(planned.key) == "done":
        return "exists"
    cell = planned.cell
    set_threads(cell.setting("threads", 1))
    started = time.time()
    try:
        task = Resolver().task(cell.task, cell.seed)
        if task_identity(cell.task, task) != planned.config["task"]:
            raise IclgdError(
                f"the data of task {cell.task_label!r} changed after the sweep was planned; rerun it"
            )
        if model is None:
            model = load_cell_model(cell)
        study = cell.setting("study")
        write = _study_writer(cell, model, task, study) if study else _compare_writer(planned, model, task)
        info = {
            "key": planned.key,
            "kind": planned.config["kind"],
            "labels": planned.labels,
            "config": planned.config,
        }

        def writer(folder: Path) -> dict:
            timing = write(folder)
            timing.setdefault("run_time_s", round(time.time() - started, 3))
            return {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), **timing}

        wrote = store.write_cell(planned.key, info, writer)
    except Exception as err:  # one cell's failure is recorded; the sweep goes on
        store.record_failure(planned.key, planned.labels, err)
        return "failed"
    return "done" if wrote else "exists"


def _split_timing(config: dict) -> tuple[dict, dict]:
    kept = {k: v for k, v in config.items() if k not in TIMING_KEYS}
    return kept, {k: config[k] for k in TIMING_KEYS if k in config}


def _compare_writer(planned: Planned, model, task) -> Callable[[Path], dict]:
    from iclgd_lens.engine.compare import compare
    from iclgd_lens.engine.gd import GDConfig
    from iclgd_lens.engine.results import Results

    cell = planned.cell

    def write(folder: Path) -> dict:
        results = compare(
            model,
            task,
            gd=GDConfig.resolve(cell.gd.config(), task),
            k=cell.k,
            n_episodes=cell.setting("n_episodes"),
            n_queries=cell.setting("n_queries"),
            seed=cell.seed,
            baselines=cell.setting("baselines"),
            probes=planned.config["probes"],  # the resolved names its key records
            share_prefix=cell.setting("share_prefix"),
            batch_size=cell.setting("batch_size"),
            progress=False,
            artifacts=cell.setting("artifacts"),
            check_resources=cell.setting("check_resources"),
        )
        config, timing = _split_timing(results.config)
        config["sweep_cell"] = {"key": planned.key, **planned.labels}
        table = results.table.assign(
            cell=planned.key, model=cell.model_label, task=cell.task_label, gd=cell.gd.label, seed=cell.seed
        )
        Results(table, config, results.artifacts).save(folder)
        return timing

    return write


def _study_writer(cell: Cell, model, task, study: dict) -> Callable[[Path], dict]:
    from iclgd_lens.engine.gd import GDConfig
    from iclgd_lens.plugins import load_study

    params = {k: v for k, v in study.items() if k != "name"}
    run = load_study(study["name"])
    accepted = inspect.signature(run).parameters
    offered = {
        "model": model,
        "task": task,
        "k": cell.k,
        "seed": cell.seed,
        "gd": GDConfig.resolve(cell.gd.config(), task),
        "n_episodes": cell.setting("n_episodes"),
        "n_queries": cell.setting("n_queries"),
        "progress": False,
    }
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise IclgdError(
            f"study {study['name']!r} has no parameter {unknown[0]!r}; it takes {', '.join(accepted)}"
        )
    kwargs = {**{k: v for k, v in offered.items() if k in accepted}, **params}

    def write(folder: Path) -> dict:
        result = run(**kwargs)
        result.config, timing = _split_timing(dict(result.config))
        result.save(folder)
        result.table.to_parquet(folder / "study.parquet", index=False)
        return timing

    return write


def run_cell_job(store_root: str, planned: Planned) -> str:
    """The function a submitit job or a Ray task runs: one cell, its model loaded in the job."""
    with interrupts.handled():  # SIGTERM (a scheduler stopping the job) removes the cell in flight
        return run_cell(Store(store_root), planned)


# ---- the sweep -----------------------------------------------------------------------------
def run_sweep(
    spec: SweepSpec,
    store: Store | str | os.PathLike | None = None,
    *,
    executor: str = "local",
    on_cell: Callable[[Planned, str], None] | None = None,
    retry_failed: bool = True,
    **executor_options: Any,
) -> SweepSummary:
    """Compute the cells of `spec` that the store lacks (failed ones again unless
    `retry_failed=False`) and return what was done. `executor`: "local" (this process; each
    model loaded once), "submitit" (`cluster="local"` for subprocess jobs on this machine,
    "slurm", or None to let submitit choose; SLURM options passed through) or "ray" (`address`
    of a running cluster, or a local instance with `num_cpus`). `on_cell(planned, status)` is
    called after each cell. An interrupt (Ctrl-C, SIGTERM) loses at most the cells in flight."""
    from iclgd_lens.sweep import executors

    if executor not in EXECUTORS:
        raise IclgdError(f"unknown executor {executor!r}; choose {', '.join(EXECUTORS)}")
    store = store if isinstance(store, Store) else Store(store or spec.store or "iclgd-store")
    # everything is checked before the store is written: the executor's options, the place,
    # every cell's model, task and settings
    executors.check_options(executor, spec.threads, executor_options)
    store.check_place()
    planned = plan(spec, store)
    existed = store.root.exists()
    fresh = not existed or not any(store.root.iterdir())
    store.create()
    save_hash_cache(store.root / "fingerprints.json")
    store.clean_stale()
    summary = SweepSummary(store=str(store.root))
    todo = []
    for p in planned:
        if p.status == "done" or (p.status == "failed" and not retry_failed):
            summary.reused.append(p.key) if p.status == "done" else summary.failed.setdefault(
                p.key, store.failure(p.key) or ""
            )
        else:
            todo.append(p)

    def done(p: Planned, status: str) -> None:
        if status == "failed":
            summary.failed[p.key] = store.failure(p.key) or "failed"
        elif status == "exists":
            summary.reused.append(p.key)
        else:
            summary.computed.append(p.key)
        if on_cell is not None:
            on_cell(p, status)

    if todo:
        run = {"local": executors.run_local, "submitit": executors.run_submitit, "ray": executors.run_ray}[
            executor
        ]
        with interrupts.handled():  # SIGTERM unwinds like Ctrl-C, so the cell in flight is removed
            try:
                run(todo, store, done, **executor_options)
            except IclgdError:  # e.g. the executor did not start: leave no empty store behind
                if fresh:
                    _remove_unused_store(store, keep_root=existed)
                raise
            interrupts.check()  # an interrupt a destructor swallowed during the last cell
    return summary


def _remove_unused_store(store: Store, keep_root: bool) -> None:
    """Remove what this run created of a new store (a folder that was new, or empty: then
    `keep_root`) when no cell was filed, failed or run in it; a store with any cell is kept."""
    import shutil

    if any(
        any((store.root / sub).iterdir())
        for sub in ("cells", "failed", "runs")
        if (store.root / sub).is_dir()
    ):
        return
    for sub in ("cells", "failed", "runs", "tmp", "jobs"):
        shutil.rmtree(store.root / sub, ignore_errors=True)
    (store.root / "fingerprints.json").unlink(missing_ok=True)
    if not keep_root:
        with contextlib.suppress(OSError):
            store.root.rmdir()  # only when nothing else is in it


def status_rows(spec: SweepSpec, store: Store | str | os.PathLike) -> list[dict]:
    """One dict per cell: key, status, the axis labels, and the error of a failed cell."""
    store = store if isinstance(store, Store) else Store(store)
    rows = []
    for p in plan(spec, store, strict=False):
        row = {"key": p.key, "status": p.status, **p.labels}
        if p.status == "failed":
            row["error"] = store.failure(p.key)
        rows.append(row)
    return rows


__all__ = ["Planned", "SweepSummary", "plan", "run_cell", "run_sweep", "status_rows"]
