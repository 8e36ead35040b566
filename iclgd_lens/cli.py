"""The `iclgd-lens` command line.

    iclgd-lens report                      # embedded tiny model, default task, k = 8 -> iclgd-report/
    iclgd-lens report --k 1,2,4,8          # a k sweep
    iclgd-lens render results.json --out DIR
    iclgd-lens sweep grid.toml [--dry-run | --status] [--executor submitit|ray]
    iclgd-lens render iclgd-store/          # the whole sweep
    iclgd-lens study order-sensitivity --set n_permutations=10
    iclgd-lens train --variant icl --out DIR     # retrain an embedded tiny model
    iclgd-lens list

Exit 0 on success; exit 2 with one line on stderr for bad input (no tracebacks); exit 130 with
one line on Ctrl-C or SIGTERM, after temporary folders are removed.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default; with other work on a small machine that made compare()
# 30x slower (docs/performance.md). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import inspect
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional, Sequence

import typer
from typer.core import TyperGroup

from iclgd_lens import interrupts
from iclgd_lens.errors import IclgdError
from iclgd_lens.limits import MAX_SEED, MAX_THREADS, MAX_TRAIN_STEPS

DEFAULT_OUT = "iclgd-report"
DEFAULT_MODEL = "tiny-llama-icl"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = 2, where: str = "iclgd-lens") -> None:
    typer.echo(f"{where}: error: {_one_line(message)}", err=True)
    sys.exit(code)


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"iclgd-lens: note: {_one_line(message)}", err=True)


def _os_error_line(err: OSError) -> str:
    """An operating-system error on a user's path as one line: which path, and why."""
    name = str(err.filename) if err.filename is not None else ""
    shown = name if len(name) <= 120 else name[:60] + "..." + name[-40:]
    return f"cannot use {shown}: {err.strerror or err}" if shown else f"{err.strerror or err}"


class _OneLineErrors(TyperGroup):
    """The command group, with every user error (usage or IclgdError) turned into one stderr line."""

    def invoke(self, ctx):
        try:
            rv = super().invoke(ctx)
            interrupts.check()  # a Ctrl-C that a destructor swallowed still ends the run as interrupted
            return rv
        except KeyboardInterrupt:  # typer would turn it into a silent exit 130
            _fail("interrupted; no output was left half-written", 130)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        warnings.showwarning = _note  # library warnings as one line each
        try:
            with interrupts.handled():  # SIGTERM unwinds like Ctrl-C; neither is lost in a destructor
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as err:  # click's usage errors (typer vendors click)
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `iclgd-lens`: show the help
                typer.echo(err.format_message())
                sys.exit(0)
            where = ctx.command_path if ctx is not None else "iclgd-lens"
            _fail(f"{err.format_message()} (see {where} --help)", 2, where)
        except typer.Abort:
            _fail("aborted", 130)
        except IclgdError as err:
            _fail(str(err))
        except RecursionError:  # json / tomllib on input nested thousands deep
            _fail("an input is nested too deeply to read (a JSON or TOML file, or a --set value)")
        except OSError as err:  # a path the system refuses: unreadable, too long, not a folder
            _fail(_os_error_line(err))
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="iclgd-lens",
    cls=_OneLineErrors,
    help="Compare in-context learning with gradient descent, layer by layer, and write an HTML report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ---- helpers ------------------------------------------------------------------------------------
def set_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads: `threads`, or min(4, cpu count). Returns the number set."""
    import torch

    n = threads if threads is not None else min(4, os.cpu_count() or 1)
    if not 1 <= n <= MAX_THREADS:
        raise IclgdError(f"--threads must be from 1 to {MAX_THREADS}, got {n}")
    torch.set_num_threads(n)
    return n


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """`--set name=value` pairs; values are read as JSON when they parse (numbers, lists), else text."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise IclgdError(f"--set takes name=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            if raw.lstrip()[:1] in ("[", "{", '"'):  # meant as JSON: say where it breaks
                raise IclgdError(
                    f"--set {item}: the value is not valid JSON ({err.msg} at character {err.pos})"
                )
            value = raw
        out[name.strip().replace("-", "_")] = value
    return out


def load_user_files(hooks: Sequence[Path] = (), analyses: Sequence[Path] = ()) -> None:
    """Import users' probe files (--hooks) and analysis files (--analyses) so they register."""
    from iclgd_lens.plugins import load_file

    for path in hooks:
        load_file(path, "probes")
    for path in analyses:
        load_file(path, "analyses")


def _gd_presets() -> tuple[str, ...]:
    from iclgd_lens.engine.gd import PRESETS

    return PRESETS


def _check_ks_before_loading(model: str, task, ks: Sequence[int]) -> None:
    """For an embedded model or a local folder: refuse an impossible k from its config and
    tokenizer alone, in a second, before the weights are loaded (`compare` checks it again)."""
    from iclgd_lens.engine.compare import check_k_fits
    from iclgd_lens.models import EMBEDDED_MODELS, embedded_model_path

    folder = embedded_model_path(model) if model in EMBEDDED_MODELS else Path(model).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        return
    try:
        n_ctx = json.loads(config.read_text()).get("max_position_embeddings")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # a config that is not a JSON object, wrong types, a broken tokenizer ...
        return  # load_model says what is wrong with the folder, in one line
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool):
        return
    for k in ks:
        check_k_fits(tokenizer, n_ctx, task, k)


def _load_task(task: Optional[str], seed: int):
    """None -> the default task of the embedded models (compare's default); else a paper task or data file."""
    if task is None or task == "default":
        return None
    from iclgd_lens.tasks.formats import load_task

    return load_task(task, seed=seed)


def _data_task(data, template, label_words, text_column, label_column, seed: int, task=None):
    """The task of `report --data FILE` (with its template, label words and columns), or None."""
    given = [
        n
        for n, v in (
            ("--template", template),
            ("--label-words", label_words),
            ("--text-column", text_column),
            ("--label-column", label_column),
        )
        if v is not None
    ]
    if data is None:
        if given:
            raise IclgdError(f"{given[0]} describes the file of --data; pass --data FILE too")
        return None
    if task is not None:
        raise IclgdError("--task and --data both name a task; give one of them")
    from iclgd_lens.tasks.formats import load_task

    words = [w.strip() for w in label_words.split(",")] if label_words is not None else None
    return load_task(
        str(data),
        template=template,
        label_words=words,
        text_column=text_column,
        label_column=label_column,
        seed=seed,
    )


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _no_library_progress_bars() -> None:
    """--no-progress: transformers' and the hub's own bars (loading weights) stay quiet too."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    disable_progress_bars()


# ---- commands ------------------------------------------------------------------------------------
@app.command()
def report(
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, local HF folder, or hub id."),
    task: Optional[str] = typer.Option(
        None, help="Paper task name or data file/folder (default: the embedded models' task)."
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Your own data file or folder (.jsonl/.csv with a split column, or train/test files).",
    ),
    template: Optional[str] = typer.Option(
        None, help="Prompt template of --data, with one {text} field (e.g. 'Review: {text} Verdict:')."
    ),
    label_words: Optional[str] = typer.Option(
        None, "--label-words", help="Comma-separated label words of --data (index = label id)."
    ),
    text_column: Optional[str] = typer.Option(
        None, "--text-column", help="Column of --data holding the text."
    ),
    label_column: Optional[str] = typer.Option(
        None, "--label-column", help="Column of --data holding the label (id or label word)."
    ),
    k: List[str] = typer.Option(
        ["8"], "--k", help="Demonstrations per episode; repeat or comma-separate for a k sweep."
    ),
    queries: int = typer.Option(
        6, min=1, help="Queries per episode (the embedded models' task holds out at most 6)."
    ),
    episodes: int = typer.Option(
        8,
        min=1,
        help="Demonstration sets (episodes): the unit of every interval and test (8 gives p down to 0.0078).",
    ),
    gd: str = typer.Option("dai", help="GD preset: dai, shen, shen-single-layer, deutch."),
    lr: Optional[float] = typer.Option(
        None, help="Override the learning rate (default: the task's own, else the preset's)."
    ),
    epochs: Optional[int] = typer.Option(None, help="Override the preset's epochs."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Override the preset's GD batch size."
    ),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed for episodes, baselines and GD order."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: str = typer.Option(
        "float32", help="float32, bfloat16, float16, float64 (or fp32, bf16, fp16, fp64)."
    ),
    out: Path = typer.Option(
        Path(DEFAULT_OUT), help="Report folder (replaced only when the new one is complete)."
    ),
    single_file: bool = typer.Option(False, "--single-file", help="Write one self-contained report.html."),
    hooks: List[Path] = typer.Option(
        [], "--hooks", help="Python file of @probe functions to record too (repeatable)."
    ),
    analyses: List[Path] = typer.Option(
        [], "--analyses", help="Python file of @analysis functions for the report (repeatable)."
    ),
    no_resource_check: bool = typer.Option(
        False,
        "--no-resource-check",
        help="Run even if the estimated work or GD-delta memory looks far beyond this machine.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: min(4, cpu count))."),
) -> None:
    """Run the ICL-vs-GD comparison and write the interactive report."""
    set_threads(threads)
    from iclgd_lens.study import parse_numbers

    ks = parse_numbers(k, "--k", minimum=0)
    if max(ks) == 0:
        raise IclgdError(
            "--k 0 alone compares nothing: with no demonstrations ICL is the zero-shot run and GD has "
            "nothing to train on; give k >= 1 (0 may stand beside other k, for zero-shot accuracy)"
        )
    load_user_files(hooks, analyses)
    from iclgd_lens.report import check_report_target

    check_report_target(out)

    from tqdm.auto import tqdm

    from iclgd_lens.engine.compare import compare
    from iclgd_lens.engine.gd import GDConfig
    from iclgd_lens.engine.results import Results
    from iclgd_lens.models import load_model
    from iclgd_lens.report import render_report
    from iclgd_lens.tasks.mapping import default_task

    the_task = _data_task(data, template, label_words, text_column, label_column, seed, task)
    if the_task is None:
        the_task = _load_task(task, seed)
    overrides = {
        name: value
        for name, value in (("lr", lr), ("epochs", epochs), ("batch_size", batch_size))
        if value is not None
    }
    gd_config = replace(
        GDConfig.resolve(gd, the_task if the_task is not None else default_task(seed=seed)), **overrides
    )
    _check_ks_before_loading(model, the_task if the_task is not None else default_task(seed=seed), ks)
    if no_progress:
        _no_library_progress_bars()
    bridge = load_model(model, device=device, dtype=dtype)
    parts = []
    for k_value in tqdm(ks, desc="k", disable=no_progress or len(ks) == 1):
        with warnings.catch_warnings():  # k = 0 beside other k is asked for: its zero-shot accuracy
            warnings.filterwarnings("ignore", message="k=0: with no demonstrations")
            part = compare(
                bridge,
                the_task,
                gd=gd_config,
                k=k_value,
                n_episodes=episodes,
                n_queries=queries,
                seed=seed,
                progress=not no_progress,
                check_resources=not no_resource_check,
            )
        parts.append(part)
    results = Results.concat(parts)
    path = render_report(results, out, single_file=single_file)
    typer.echo(str(path))


@app.command()
def render(
    results: List[Path] = typer.Argument(
        ...,
        help="results.json / results.parquet / a report folder; a sweep store or spec (.toml, preset); "
        "or several results files to draw side by side.",
    ),
    out: Path = typer.Option(Path(DEFAULT_OUT), help="Report folder."),
    single_file: bool = typer.Option(
        False,
        "--single-file",
        help="Write one self-contained report.html (one saved run; a sweep or several runs make a folder).",
    ),
    analyses: List[Path] = typer.Option(
        [], "--analyses", help="Python file of @analysis functions (repeatable)."
    ),
    store: Optional[Path] = typer.Option(None, help="The store of a sweep spec (default: the spec's own)."),
) -> None:
    """Write the report for saved results, a whole sweep, or several runs together (no model needed)."""
    from iclgd_lens.engine.results import Results
    from iclgd_lens.report import load_studies, render_report
    from iclgd_lens.report.sweep import render_sweep, render_sweep_runs
    from iclgd_lens.sweep.spec import preset_names

    load_user_files((), analyses)
    first = results[0]
    is_spec = first.suffix == ".toml" or (not first.exists() and str(first) in preset_names())
    if store is not None and not (len(results) == 1 and is_spec):
        raise IclgdError("--store applies only to a sweep spec (a .toml file or a preset); leave it out")
    if len(results) == 1 and (is_spec or (first / "cells").is_dir()):
        if single_file:
            raise IclgdError("a sweep report is a folder of pages; leave out --single-file")
        typer.echo(str(render_sweep(first, out, store=store)))
        return
    if len(results) > 1:
        if single_file:
            raise IclgdError("several runs make a folder of pages; leave out --single-file")
        typer.echo(str(render_sweep_runs(results, out)))
        return
    loaded = Results.load(first)
    folder = first if first.is_dir() else first.parent
    studies = load_studies(folder)  # a study's report: its saved results rebuild its page
    if loaded.table.empty and not studies:
        raise IclgdError(f"{first} holds no result rows: nothing to render")
    path = render_report(
        loaded, out, single_file=single_file, study_results=studies, **({"analyses": {}} if studies else {})
    )
    typer.echo(str(path))


@app.command()
def study(
    name: str = typer.Argument(..., help="Study name (see `iclgd-lens list`)."),
    model: Optional[str] = typer.Option(
        None, help="Model name or path, for studies that take one (default: the study's)."
    ),
    task: Optional[str] = typer.Option(None, help="Task name or data file, for studies that take one."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed."),
    settings: List[str] = typer.Option(
        [], "--set", help="Study parameter name=value (repeatable; JSON values)."
    ),
    preset: Optional[str] = typer.Option(
        None, help="The study's named preset, for studies that have them (same as --set preset=NAME)."
    ),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: iclgd-study-NAME/)."),
    single_file: bool = typer.Option(False, "--single-file", help="Write one self-contained report.html."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: min(4, cpu count))."),
) -> None:
    """Run one study (an experiment in iclgd_lens.analyses) and write its report."""
    import pandas as pd

    from iclgd_lens.engine.results import TABLE_COLUMNS, Results
    from iclgd_lens.plugins import load_study
    from iclgd_lens.report import check_report_target, render_report

    run = load_study(name)
    out = out or Path(f"iclgd-study-{name}")
    check_report_target(out)
    set_threads(threads)
    params = inspect.signature(run).parameters
    kwargs = parse_settings(settings)
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise IclgdError(
            f"study {name!r} has no parameter {unknown[0]!r}; it takes {', '.join(params) or 'none'}"
        )
    from iclgd_lens.study import check_study_args

    kwargs = check_study_args(run, kwargs, name)  # --set k=abc: one line, before any work
    if "seed" in params:
        kwargs.setdefault("seed", seed)
    if "progress" in params:
        kwargs.setdefault("progress", not no_progress)
    if no_progress:
        _no_library_progress_bars()
    if preset is not None:
        if "preset" not in params:
            raise IclgdError(f"study {name!r} has no presets")
        kwargs["preset"] = preset
    if model is not None:  # studies take a model name (or path) and load it themselves
        if "model" not in params:
            raise IclgdError(f"study {name!r} does not take a model")
        kwargs["model"] = model
    if task is not None:
        if "task" not in params:
            raise IclgdError(f"study {name!r} does not take a task")
        kwargs["task"] = _load_task(task, seed)
    result = run(**kwargs)
    empty = Results(
        pd.DataFrame(columns=list(TABLE_COLUMNS)), {"study": name, **getattr(result, "config", {})}, {}
    )
    table = getattr(result, "table", None)
    path = render_report(
        empty,
        out,
        single_file=single_file,
        study_results=[result],
        analyses={},
        csv_tables={f"study_{name}.csv": table} if isinstance(table, pd.DataFrame) else None,
    )
    typer.echo(str(path))


@app.command()
def sweep(
    spec: str = typer.Argument(..., help="A sweep spec (.toml) or a preset: dai2023, shen2024, deutch2024."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the cells with their estimated work and memory."
    ),
    status: bool = typer.Option(False, "--status", help="Say done / missing / failed for every cell."),
    executor: str = typer.Option(
        "local", help="local (this process), submitit (SLURM or --cluster local), ray."
    ),
    store: Optional[Path] = typer.Option(
        None, help="The results store (default: the spec's, else iclgd-store/)."
    ),
    model: List[str] = typer.Option([], "--model", help="Run on these models instead (repeatable)."),
    data_dir: Optional[Path] = typer.Option(
        None,
        "--data-dir",
        help="Read the spec's paper tasks from this folder (sst2.jsonl, cb.csv, agnews/...).",
    ),
    settings: List[str] = typer.Option(
        [], "--set", help="Spec setting name=value (JSON values: --set k=[1,2] --set n_episodes=4)."
    ),
    cluster: str = typer.Option(
        "slurm", help="submitit: slurm, local (subprocess jobs on this machine), or auto (submitit's choice)."
    ),
    partition: Optional[str] = typer.Option(None, help="submitit/SLURM partition."),
    gpus_per_task: int = typer.Option(0, "--gpus-per-task", min=0, help="submitit: GPUs per cell job."),
    cpus_per_task: Optional[int] = typer.Option(
        None, "--cpus-per-task", min=1, help="submitit: CPUs per job."
    ),
    mem_gb: Optional[float] = typer.Option(None, "--mem-gb", help="submitit: memory per job (GB)."),
    time_limit: int = typer.Option(60, "--time-limit", min=1, help="submitit: minutes per cell job."),
    array_parallelism: Optional[int] = typer.Option(
        None, "--array-parallelism", min=1, help="SLURM: at most this many cell jobs at once."
    ),
    max_parallel: Optional[int] = typer.Option(
        None,
        "--max-parallel",
        min=1,
        help="submitit --cluster local: jobs at once (default: cores / threads).",
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="ray: a running cluster (ray://...)."
    ),
    ray_cpus: Optional[int] = typer.Option(
        None, "--ray-cpus", min=1, help="ray: CPUs of the local instance."
    ),
) -> None:
    """Run a sweep (models x tasks x k x GD settings x seeds) into a content-addressed store;
    a rerun computes only the missing cells."""
    from iclgd_lens.sweep import run as sweep_run
    from iclgd_lens.sweep.spec import load_spec, on_data_dir
    from iclgd_lens.sweep.store import Store

    if mem_gb is not None and not mem_gb > 0:  # NaN too
        raise IclgdError(f"--mem-gb must be a number of GB > 0, got {mem_gb:g}")
    if executor not in sweep_run.EXECUTORS:  # with --dry-run too, not only when the cells run
        raise IclgdError(f"unknown executor {executor!r}; choose {', '.join(sweep_run.EXECUTORS)}")
    the_spec = load_spec(spec)
    changes = parse_settings(settings)
    if model:
        changes["models"] = list(model)
    if changes:
        the_spec = the_spec.with_settings(**changes)
    if data_dir is not None:
        the_spec, missing = on_data_dir(the_spec, data_dir)
        if missing:
            _say(
                f"iclgd-lens: note: no data for {', '.join(missing)} in {data_dir}; those tasks are left out"
            )
    the_store = Store(store or the_spec.store or "iclgd-store")
    if dry_run or status:
        _sweep_listing(the_spec, the_store, dry_run)
        return
    options: dict[str, Any] = {}
    if executor == "submitit":
        options = dict(
            cluster=None if cluster == "auto" else cluster,
            partition=partition,
            gpus_per_task=gpus_per_task,
            cpus_per_task=cpus_per_task,
            mem_gb=mem_gb,
            timeout_min=time_limit,
            array_parallelism=array_parallelism,
            max_parallel=max_parallel,
        )
    elif executor == "ray":
        options = dict(address=ray_address, num_cpus=ray_cpus)
    count = {"n": 0}

    def report_cell(planned, state: str) -> None:
        count["n"] += 1
        labels = " ".join(f"{k}={v}" for k, v in planned.labels.items())
        _say(f"[{count['n']}] {state} {planned.key} {labels}")

    try:
        summary = sweep_run.run_sweep(the_spec, the_store, executor=executor, on_cell=report_cell, **options)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a scheduler
        _say(
            f"iclgd-lens: interrupted; the finished cells stay in {the_store.root} and the cell in flight "
            "was removed: the same command resumes"
        )
        sys.exit(130)
    typer.echo(summary.line())
    if summary.failed:
        for key, error in summary.failed.items():
            _say(f"iclgd-lens: failed cell {key}: {error}")
        sys.exit(1)


def _sweep_listing(spec, store, estimates: bool) -> None:
    """--dry-run (cells, status, estimated work and memory) and --status (with failures)."""
    from iclgd_lens.sweep.identity import Resolver
    from iclgd_lens.sweep.run import plan

    store.check_place()  # a place the run refuses (someone else's files), the listing refuses too
    planned = plan(spec, store, strict=False)
    resolver = Resolver(strict=False)
    counts: dict[str, int] = {}
    total_tflop = 0.0
    cannot_run = 0
    for p in planned:
        counts[p.status] = counts.get(p.status, 0) + 1
        labels = " ".join(f"{k}={v}" for k, v in p.labels.items())
        line = f"{p.status:8s} {p.key} {labels}"
        if estimates:
            from iclgd_lens.sweep.estimate import estimate

            est = estimate(p, resolver.task(p.cell.task, p.cell.seed))
            if est["cannot_run"] is not None:
                cannot_run += 1
                line += f"  cannot run: {_one_line(est['cannot_run'])}"
            elif est["tflop"] is None:
                line += "  work ?  memory ? (model not on this machine)"
            else:
                total_tflop += est["tflop"]
                gb = est["memory_gb"]
                memory = f"{gb:.3g} GiB" if gb >= 1 else f"{gb * 1024:.3g} MiB"
                line += f"  work {est['tflop']:.3g} TFLOP  memory {memory}"
        if p.status == "failed":
            line += f"  error: {store.failure(p.key)}"
        elif p.status == "damaged":
            line += "  (its data files are gone: the next run computes it again)"
        typer.echo(line)
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    extra = f"; estimated work {total_tflop:.3g} TFLOP in all" if estimates else ""
    if cannot_run:
        extra += f"; {cannot_run} cell(s) cannot run as specified (see above)"
    typer.echo(f"{len(planned)} cells ({tally}) in store {store.root}{extra}")


@app.command("train")
def train_model(
    variant: str = typer.Option(
        ...,
        help="icl (next-token loss on the corpus; ICL has to emerge) or iclobj (the explicit ICL objective).",
    ),
    out: Path = typer.Option(..., help="Folder for the model, tokenizer and training_log.json."),
    steps: Optional[int] = typer.Option(
        None, min=1, max=MAX_TRAIN_STEPS, help="Training steps (default: the configuration's)."
    ),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed of the model init and the data."),
    threads: int = typer.Option(
        1, min=1, max=MAX_THREADS, help="torch threads (1 or 2; more oversubscribes)."
    ),
    micro: bool = typer.Option(False, "--micro", help="A seconds-long tiny configuration (tests)."),
) -> None:
    """Train an embedded tiny LLaMA on the synthetic corpus (seeded; CPU, minutes)."""
    from iclgd_lens.models.making.training import MICRO, VARIANTS, TrainConfig, train

    if variant not in VARIANTS:
        raise IclgdError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    overrides = dict(MICRO) if micro else {}
    if steps is not None:
        overrides["steps"] = steps
    config = TrainConfig(variant=variant, seed=seed, threads=threads, **overrides)
    import shlex

    args = ["--variant", variant, "--out", str(out), "--seed", str(seed), "--threads", str(threads)]
    args += (["--steps", str(steps)] if steps is not None else []) + (["--micro"] if micro else [])
    train(config, out=out, log=_say, command=shlex.join(["iclgd-lens", "train", *args]))  # progress on stderr
    typer.echo(str(out))


@app.command("list")
def list_things() -> None:
    """List embedded models, tasks, GD presets, probes, studies and report analyses."""
    from iclgd_lens.plugins import load_entry_points

    def show(title: str, names: Sequence[str], note: str = "") -> None:
        typer.echo(f"{title}:{'  (' + note + ')' if note else ''}")
        for n in names:
            typer.echo(f"  {n}")

    try:
        from iclgd_lens.models import EMBEDDED_MODELS

        show("models", EMBEDDED_MODELS, "or a local HF folder, or a hub id")
    except ImportError:
        show("models", [DEFAULT_MODEL])
    tasks = ["default (the embedded models' mapping task)"]
    try:
        from iclgd_lens.tasks.formats import PAPER_FORMATS

        tasks += list(PAPER_FORMATS)
    except ImportError:
        pass
    show("tasks", tasks, "or a .jsonl/.csv file or folder")
    show("gd presets", _gd_presets())
    try:
        from iclgd_lens.hooks import PROBES, get_probes

        get_probes(None)  # loads the built-in probes
        show(
            "probes",
            [f"{n}: {p.description}" if getattr(p, "description", "") else n for n, p in PROBES.items()],
        )
    except ImportError:
        show("probes", [])
    import importlib.util

    def available(target) -> str:
        if callable(target):
            return ""
        module = target.partition(":")[0]
        try:
            return "" if importlib.util.find_spec(module) else "  (not installed)"
        except ModuleNotFoundError:
            return "  (not installed)"

    show("studies", [f"{n}{available(t)}" for n, t in load_entry_points("studies").items()])
    analyses = sorted(load_entry_points("analyses"))
    show("report analyses", analyses, "" if analyses else "none installed; add yours with --analyses FILE")
    from iclgd_lens.sweep.spec import preset_names

    show("sweep presets", preset_names(), "iclgd-lens sweep NAME --model ... --data-dir ...")


def main() -> None:  # `python -m iclgd_lens.cli`
    app()


if __name__ == "__main__":
    main()
