"""Where cells run: this process, submitit jobs (SLURM, or subprocesses on this machine), Ray tasks.

Each executor takes the cells to compute (`run.Planned`), the store, and `done(planned, status)`
to call as each one finishes; one cell is one job. None of them is a scheduler of its own:
submitit and Ray place the jobs, and the store makes a rerun compute only what is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from iclgd_lens import interrupts
from iclgd_lens.errors import IclgdError
from iclgd_lens.sweep.run import Planned, load_cell_model, run_cell, run_cell_job
from iclgd_lens.sweep.store import Store

Done = Callable[[Planned, str], None]


# ---- in this process ---------------------------------------------------------------------------
def run_local(todo: Sequence[Planned], store: Store, done: Done) -> None:
    """One cell after the other in this process, each model loaded once for all its cells
    (cells arrive grouped by model). A model that fails to load fails its cells, one line each."""
    import torch

    threads_before = torch.get_num_threads()
    current: tuple[Any, Any] | None = None
    broken: dict[Any, BaseException] = {}  # models that failed to load: their cells fail alike
    try:
        for planned in todo:
            interrupts.check()  # a Ctrl-C that a destructor swallowed stops before the next cell
            cell = planned.cell
            model_id = (cell.model, cell.setting("device"), cell.setting("dtype"))
            if current is None or current[0] != model_id:
                current = None  # the previous model is released before the next one loads
                try:
                    if model_id in broken:
                        raise broken[model_id]
                    current = (model_id, load_cell_model(cell))
                except Exception as err:
                    broken[model_id] = err
                    store.record_failure(planned.key, planned.labels, err)
                    done(planned, "failed")
                    continue
            done(planned, run_cell(store, planned, model=current[1]))
    finally:
        torch.set_num_threads(threads_before)


# ---- submitit --------------------------------------------------------------------------------------
SUBMITIT_OPTIONS = (
    "cluster",
    "folder",
    "partition",
    "gpus_per_task",
    "cpus_per_task",
    "mem_gb",
    "timeout_min",
    "array_parallelism",
    "max_parallel",
    "slurm_args",
)
"""Options of `run_submitit` (the CLI's --partition, --gpus-per-task, --time-limit, ...)."""


def submitit_parameters(
    cluster: str | None,
    threads: int,
    *,
    partition: str | None = None,
    gpus_per_task: int = 0,
    cpus_per_task: int | None = None,
    mem_gb: float | None = None,
    timeout_min: int = 60,
    array_parallelism: int | None = None,
    slurm_args: dict | None = None,
) -> dict[str, Any]:
    """The AutoExecutor parameters of one cell job: generic ones, and SLURM's with the `slurm_`
    prefix (only those of the cluster in use are passed on: submitit refuses the others)."""
    params: dict[str, Any] = {
        "timeout_min": timeout_min,
        "cpus_per_task": cpus_per_task or threads,
        "tasks_per_node": 1,
        "nodes": 1,
        "name": "iclgd-sweep",
    }
    if gpus_per_task:
        params["gpus_per_node"] = gpus_per_task
    if mem_gb:
        params["mem_gb"] = mem_gb
    env = [f"export OMP_NUM_THREADS={threads}", "export OMP_WAIT_POLICY=PASSIVE"]
    if cluster in (None, "slurm"):
        if partition:
            params["slurm_partition"] = partition
        if array_parallelism:
            params["slurm_array_parallelism"] = array_parallelism
        params["slurm_setup"] = env
        for key, value in (slurm_args or {}).items():
            params[key if key.startswith("slurm_") else f"slurm_{key}"] = value
    elif cluster == "local":
        params["local_setup"] = env
    return params


def run_submitit(
    todo: Sequence[Planned],
    store: Store,
    done: Done,
    *,
    cluster: str | None = "local",
    folder: str | os.PathLike | None = None,
    max_parallel: int | None = None,
    poll_s: float = 0.2,
    **options: Any,
) -> None:
    """One submitit job per cell (`AutoExecutor`; `cluster="local"` runs them as subprocesses on
    this machine, "slurm" on a SLURM cluster, None lets submitit pick). On a cluster the jobs are
    one job array (SLURM's `array_parallelism` bounds how many run at once); locally at most
    `max_parallel` (default: cores / threads) run together. Ctrl-C cancels the jobs in flight."""
    threads = todo[0].cell.setting("threads", 1) if todo else 1
    executor = _submitit_executor(folder or store.root / "jobs" / "%j", cluster, threads, options)
    if cluster != "local":  # one job array: SLURM's array_parallelism bounds how many run at once
        jobs = executor.map_array(run_cell_job, [str(store.root)] * len(todo), list(todo))
        _collect(list(zip(todo, jobs)), [], store, done, poll_s, None)
        return
    # on this machine: at most `width` subprocess jobs at once, a new one as soon as one ends
    width = max_parallel or max(1, (os.cpu_count() or 1) // threads)
    queue = list(todo)
    _collect(
        [], queue, store, done, poll_s, lambda p: executor.submit(run_cell_job, str(store.root), p), width
    )


def _submitit_executor(folder: str | os.PathLike, cluster: str | None, threads: int, options: dict):
    """submitit's AutoExecutor with a cell job's parameters; one line for what submitit refuses
    (an unknown cluster, SLURM where there is none, a parameter it does not take). A local
    executor makes its folder here."""
    try:
        import submitit
    except ImportError:
        raise IclgdError("the submitit executor needs submitit: pip install submitit") from None
    from submitit.core.plugins import get_executors

    clusters = list(get_executors())
    if cluster is not None and cluster not in clusters:
        raise IclgdError(f"submitit: unknown cluster {cluster!r}; choose {', '.join(clusters)} (or auto)")
    try:
        params = submitit_parameters(cluster, threads, **options)
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        executor.update_parameters(**params)
    except (ValueError, RuntimeError, TypeError, AssertionError) as err:
        raise IclgdError(f"submitit: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    return executor


def _positive(name: str, value: Any, kind: type = int) -> None:
    """None, or a number > 0 (a whole one for int)."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not value > 0 or value == float("inf") or (kind is int and value != int(value)):
        noun = "a whole number >= 1" if kind is int else "a number > 0"
        raise IclgdError(f"{name} must be {noun}, got {value!r}")


def check_options(executor: str, threads: int, options: dict) -> None:
    """Refuse, before the sweep writes anything, options `executor` does not take and values it
    would refuse (submitit's cluster and parameters are tried on an executor in a temporary
    folder, removed at once)."""
    known = {
        "local": (),
        "submitit": (*SUBMITIT_OPTIONS, "poll_s"),
        "ray": ("address", "num_cpus", "num_gpus"),
    }.get(executor, ())
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise IclgdError(
            f"the {executor} executor takes no option {unknown[0]!r}"
            + (f"; it takes {', '.join(known)}" if known else "")
        )
    if executor == "submitit":
        _positive("mem_gb (--mem-gb)", options.get("mem_gb"), float)
        for name in ("cpus_per_task", "timeout_min", "array_parallelism", "max_parallel"):
            _positive(name, options.get(name))
        gpus = options.get("gpus_per_task", 0)
        if not (isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 0):
            raise IclgdError(f"gpus_per_task must be a whole number >= 0, got {gpus!r}")
        import tempfile

        rest = {k: v for k, v in options.items() if k not in ("cluster", "folder", "max_parallel", "poll_s")}
        with tempfile.TemporaryDirectory(prefix="iclgd-submitit-check-") as tmp:
            _submitit_executor(Path(tmp) / "%j", options.get("cluster", "local"), threads, rest)
    elif executor == "ray":
        _positive("num_cpus", options.get("num_cpus"))
        gpus = options.get("num_gpus")
        if gpus is not None and (
            isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not gpus >= 0
        ):
            raise IclgdError(f"num_gpus must be a number >= 0, got {gpus!r}")


def _collect(
    pending: list, queue: list, store: Store, done: Done, poll_s: float, submit, width: int = 0
) -> None:
    """Wait for submitit jobs, submitting queued cells while fewer than `width` run; a job that
    died (killed, out of memory, past its time limit) records its cell as failed."""
    try:
        while pending or queue:
            interrupts.check()
            while queue and len(pending) < width:
                planned = queue.pop(0)
                pending.append((planned, submit(planned)))
            still = []
            for planned, job in pending:
                if not job.done():
                    still.append((planned, job))
                    continue
                try:
                    status = job.result()
                except Exception as err:
                    if store.status(planned.key) == "done":
                        status = "done"
                    else:
                        lines = [line for line in str(err).strip().splitlines() if line.strip()]
                        reason = lines[-1] if lines else type(err).__name__
                        store.record_failure(planned.key, planned.labels, f"job {job.job_id} died: {reason}")
                        status = "failed"
                done(planned, status)
            pending = still
            if pending:
                time.sleep(poll_s)
    except BaseException:
        for _, job in pending:
            try:
                job.cancel(check=False)
            except Exception:
                pass
        raise


# ---- Ray -------------------------------------------------------------------------------------------
def run_ray(
    todo: Sequence[Planned],
    store: Store,
    done: Done,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
) -> None:
    """One Ray task per cell, on the cluster at `address` or on a local instance started here
    (`num_cpus` cores; shut down afterwards). A cell on a GPU asks Ray for one whole GPU, so
    GPU cells run one per device. Needs the `ray` extra (pip install 'iclgd-lens[ray]')."""
    try:
        import ray
    except ImportError:
        raise IclgdError("the ray executor needs Ray: pip install 'iclgd-lens[ray]'") from None
    threads = todo[0].cell.setting("threads", 1) if todo else 1
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
            if num_gpus is not None:
                kwargs["num_gpus"] = num_gpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise IclgdError(f"ray: cannot start or reach a cluster: {str(err).splitlines()[0]}") from None
    task = ray.remote(run_cell_job)
    refs = {}
    try:
        for planned in todo:
            gpu = str(planned.cell.setting("device") or "cpu").startswith("cuda")
            ref = task.options(num_cpus=threads, num_gpus=1 if gpu else 0).remote(str(store.root), planned)
            refs[ref] = planned
        while refs:
            interrupts.check()
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                planned = refs.pop(ref)
                try:
                    status = ray.get(ref)
                except Exception as err:  # the worker died
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    store.record_failure(planned.key, planned.labels, f"ray task died: {first}")
                    status = "failed"
                done(planned, status)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
