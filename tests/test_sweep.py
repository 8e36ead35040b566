"""Sweeps: the grid of a spec, cell identity, the content-addressed store, interrupts and
reruns, the same tables from every executor (in-process, submitit's local subprocess jobs, a
local Ray instance), and what pandas / pyarrow.dataset / DuckDB read from the store."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from iclgd_lens.errors import IclgdError
from iclgd_lens.sweep import Store, SweepSpec, cells, plan, run_sweep, status_rows
from iclgd_lens.sweep.identity import cell_key

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "iclgd_lens.cli"]

GRID_TOML = """
name = "grid"
models = ["tiny-llama-icl", "tiny-llama-iclobj"]
k = [1, 2]
seeds = [0, 1]
n_episodes = 3
n_queries = 3
threads = 1
"""


def cli(*args):
    """The iclgd-lens command line, in this process."""
    from typer.testing import CliRunner

    from iclgd_lens.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def grid_spec() -> SweepSpec:
    """The done-when sweep: 2 models x 2 k x 2 seeds on the embedded models (every baseline)."""
    return SweepSpec(
        name="grid",
        models=["tiny-llama-icl", "tiny-llama-iclobj"],
        k=[1, 2],
        seeds=[0, 1],
        n_episodes=3,
        n_queries=3,
    )


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of every cell folder, by its path under cells/ (what must match bitwise)."""
    return {
        str(p.relative_to(root / "cells")): p.read_bytes()
        for p in sorted((root / "cells").rglob("*"))
        if p.is_file()
    }


def assert_no_partial(root: Path) -> None:
    """cells/ holds complete cells only (a cell.json beside its tables), nothing half-written."""
    for folder in (root / "cells").iterdir():
        names = {p.name for p in folder.iterdir()}
        assert {"cell.json", "results.json", "results.parquet"} <= names, (folder, names)
        assert not any(n.startswith(".") for n in names), names


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The grid computed once, uninterrupted, in this process."""
    root = tmp_path_factory.mktemp("reference")
    summary = run_sweep(grid_spec(), root)
    assert len(summary.computed) == 8 and not summary.failed and not summary.reused
    return root


# ---- the grid -------------------------------------------------------------------------------------
def test_cells_are_the_cross_product_minus_exclude_with_zip_and_gd_grids(tmp_path):
    (tmp_path / "mine.csv").write_text("review,stars,split\ngood film,good,train\nbad film,bad,test\n")
    text = """
name = "t"
models = ["tiny-llama-icl", "tiny-llama-iclobj"]
tasks = ["default", {data = "mine.csv", template = "Review: {text} Verdict:", label_words = ["bad", "good"], \
text_column = "review", label_column = "stars"}]
k = [1, 2, 4]
seeds = [0, 1]
gd = ["dai", {preset = "shen", lr = [1e-3, 1e-4], epochs = [2, 3]}]
exclude = [{model = "tiny-llama-iclobj", k = 4}]
"""
    (tmp_path / "t.toml").write_text(text)
    spec = SweepSpec.from_toml(tmp_path / "t.toml")
    grid = cells(spec)
    gd_labels = sorted({c.gd.label for c in grid})
    assert gd_labels == sorted(
        ["dai"] + [f"shen lr={lr:g} epochs={e}" for lr in (1e-3, 1e-4) for e in (2, 3)]
    )
    expected = 2 * 2 * 3 * 5 * 2 - 1 * 2 * 1 * 5 * 2  # models x tasks x k x gd x seeds, minus the excluded
    assert len(grid) == expected
    assert not any(c.model == "tiny-llama-iclobj" and c.k == 4 for c in grid)
    assert grid[0].task.data is None and any(c.task.data == str(tmp_path / "mine.csv") for c in grid)
    assert [c.model for c in grid] == sorted((c.model for c in grid), key=spec.models.index)  # grouped

    zipped = SweepSpec(k=[1, 2, 4], seeds=[5, 6, 7], zip=[["k", "seed"]], models=["tiny-llama-icl"])
    assert [(c.k, c.seed) for c in cells(zipped)] == [(1, 5), (2, 6), (4, 7)]
    broadcast = SweepSpec(k=[1, 2], seeds=[3], zip=[["k", "seed"]])
    assert [(c.k, c.seed) for c in cells(broadcast)] == [(1, 3), (2, 3)]


def test_cells_that_share_a_short_name_get_labels_that_tell_them_apart(tmp_path):
    """Two tasks named alike (one with its own gd_lr), two files of one stem and two model folders
    of one name are different cells: their labels differ, so a report never pools them."""
    for folder in ("a", "b"):
        (tmp_path / folder / "llama").mkdir(parents=True)
    spec = SweepSpec(
        models=["tiny-llama-icl", str(tmp_path / "a" / "llama"), str(tmp_path / "b" / "llama")],
        tasks=["default", {"name": "default", "gd_lr": 0.3}, "x/mine.csv", "y/mine.csv"],
    )
    labels = {(c.labels["model"], c.labels["task"]) for c in cells(spec)}
    assert {m for m, _ in labels} == {"tiny-llama-icl", "a/llama", "b/llama"}
    assert {t for _, t in labels} == {"default", "default gd_lr=0.3", "x/mine.csv", "y/mine.csv"}
    alone = SweepSpec(tasks=["default", {"data": "x/mine.csv", "template": "{text} :"}])
    assert {c.labels["task"] for c in cells(alone)} == {"default", "mine"}  # no clash: short names


def test_the_sweep_report_keeps_two_tasks_of_one_name_in_two_rows(tmp_path):
    from iclgd_lens.report.sweep import combined_table, dai_table, store_cells

    spec = SweepSpec(
        tasks=["default", {"name": "default", "gd_lr": 0.3}],
        k=[1],
        n_episodes=2,
        n_queries=2,
        baselines=False,
    )
    summary = run_sweep(spec, tmp_path / "store")
    assert len(summary.computed) == 2 and not summary.failed
    table = dai_table(combined_table(store_cells(tmp_path / "store")))
    assert sorted(table["task"]) == ["default", "default gd_lr=0.3"]
    stored = pd.read_parquet(glob.glob(str(tmp_path / "store" / "cells" / "*" / "results.parquet")))
    assert set(stored["task"]) == {"default", "default gd_lr=0.3"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modles": ["x"]}, "unknown key 'modles'"),
        ({"k": [-1]}, "k takes whole numbers"),
        ({"gd": [{"preset": "dai", "lrr": 1}]}, "GD setting 'lrr' unknown"),
        ({"gd": ["nope"]}, "unknown GD preset 'nope'"),
        ({"zip": [["k", "colour"]]}, "each zip entry"),
        ({"k": [1, 2], "seeds": [1, 2, 3], "zip": [["k", "seed"]]}, "same length"),
        ({"exclude": [{"k": 8}], "k": [8]}, "every cell is excluded"),
        ({"tasks": [{"template": "x {text}"}]}, "needs `data`"),
    ],
)
def test_bad_specs_fail_in_one_line(data, message):
    with pytest.raises(IclgdError, match=message) as err:
        cells(SweepSpec.from_dict(data))
    assert "\n" not in str(err.value)


# ---- identity -------------------------------------------------------------------------------------
def test_key_is_stable_and_changes_with_every_setting_and_with_the_weights(tmp_path):
    base = SweepSpec(models=["tiny-llama-icl"], k=[2], n_episodes=2, n_queries=2)
    key = lambda spec: plan(spec, tmp_path / "s")[0].key  # noqa: E731
    first = key(base)
    assert key(base) == first and len(first) == 20
    changed = [
        base.with_settings(n_episodes=3),
        base.with_settings(threads=2),
        base.with_settings(k=[3]),
        base.with_settings(seeds=[1]),
        base.with_settings(gd=[{"preset": "dai", "lr": 0.01}]),
        base.with_settings(baselines=["random"]),
        base.with_settings(dtype="float64"),
    ]
    keys = [key(s) for s in changed]
    assert first not in keys and len(set(keys)) == len(keys)
    # the task's own learning rate is resolved into the key: dai with lr = the task's (3e-2) is the same cell
    assert key(base.with_settings(gd=[{"preset": "dai", "lr": 3e-2}])) != first  # label differs: a new cell
    assert plan(base, tmp_path / "s")[0].config["gd"]["lr"] == 3e-2

    # a local copy of the model has the same weights fingerprint; one changed byte changes the key
    from iclgd_lens.models import embedded_model_path

    copy = tmp_path / "model"
    shutil.copytree(embedded_model_path("tiny-llama-icl"), copy)
    same = plan(base.with_settings(models=[str(copy)]), tmp_path / "s")[0]
    assert same.config["model"]["fingerprint"] == plan(base, tmp_path / "s")[0].config["model"]["fingerprint"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 1))
    other = plan(base.with_settings(models=[str(copy)]), tmp_path / "s")[0]
    assert other.config["model"]["fingerprint"] != same.config["model"]["fingerprint"]
    assert cell_key(other.config) != cell_key(same.config)


# ---- interrupts and reruns ----------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_first_cell_then_a_rerun_computes_only_the_missing_cells(
    tmp_path, reference, signum
):
    root = tmp_path / "store"

    def interrupt(planned, status):  # a real signal, delivered to this process after the first cell
        os.kill(os.getpid(), signum)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid_spec(), root, on_cell=interrupt)
        time.sleep(5)  # the signal arrives before this returns
    done = Store(root).done_keys()
    assert 1 <= len(done) < 8
    assert_no_partial(root)
    assert not any((root / "tmp").iterdir())  # the cell in flight left nothing behind
    missing = [p.key for p in plan(grid_spec(), root) if p.status == "missing"]
    assert sorted(missing + done) == sorted(Store(reference).done_keys())

    summary = run_sweep(grid_spec(), root)
    assert sorted(summary.computed) == sorted(missing) and sorted(summary.reused) == sorted(done)
    assert store_files(root) == store_files(reference)  # bitwise the uninterrupted run's store


def test_a_killed_sweep_process_leaves_complete_cells_only_and_the_rerun_completes_it(tmp_path, reference):
    spec = tmp_path / "grid.toml"
    spec.write_text(GRID_TOML)
    root = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        CLI + ["sweep", str(spec), "--store", str(root)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        for line in proc.stderr:
            if "] done " in line:
                proc.kill()  # SIGKILL: no handler runs
                break
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    done = Store(root).done_keys()
    assert 1 <= len(done) < 8
    assert_no_partial(root)

    rerun = cli("sweep", spec, "--store", root)  # in this process: the same command, no restart cost
    assert rerun.exit_code == 0, rerun.output
    assert f"{8 - len(done)} computed, {len(done)} already in the store, 0 failed" in rerun.stdout
    assert not any((root / "tmp").iterdir())  # the killed process's temporary folder was cleaned
    assert store_files(root) == store_files(reference)

    status = cli("sweep", spec, "--store", root, "--status")
    assert status.exit_code == 0 and "8 cells (8 done)" in status.stdout
    assert status.stdout.count("done ") == 8


def test_a_changed_setting_makes_new_cells_and_never_touches_the_old_ones(tmp_path, reference):
    root = tmp_path / "store"
    shutil.copytree(reference, root)
    before = store_files(root)
    summary = run_sweep(grid_spec().with_settings(n_queries=2, models=["tiny-llama-icl"], seeds=[0]), root)
    assert len(summary.computed) == 2 and not summary.reused
    after = store_files(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(Store(root).done_keys()) == 10


# ---- executors -------------------------------------------------------------------------------------
def _kill_a_later_job(store: Path, found: list) -> None:
    """Once a cell is done, SIGKILL the worker process of a submitit job started after that,
    a second into its run (a job killed by the machine, no handler runs); `found` gets its pid."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and not Store(store).done_keys():
        time.sleep(0.05)
    first_done = time.time()
    while time.time() < deadline and not found:
        for proc in psutil.process_iter(["cmdline", "create_time"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "submitit.core._submit" in cmdline and str(store) in cmdline:
                if proc.info["create_time"] > first_done and time.time() - proc.info["create_time"] > 1:
                    proc.kill()
                    found.append(proc.pid)
                    break
        time.sleep(0.05)


def test_submitit_local_jobs_give_the_same_store_and_a_killed_job_loses_only_its_cell(tmp_path, reference):
    import threading

    root = tmp_path / "store"
    killed: list = []
    killer = threading.Thread(target=_kill_a_later_job, args=(root, killed), daemon=True)
    killer.start()
    summary = run_sweep(grid_spec(), root, executor="submitit", cluster="local", max_parallel=2)
    killer.join(5)
    assert killed, "no job was killed"
    assert len(summary.failed) == 1 and all("died" in error for error in summary.failed.values())
    assert len(summary.computed) == 7
    assert_no_partial(root)
    assert len(list((root / "jobs").rglob("*_log.out"))) == 8  # one subprocess job per cell

    rerun = run_sweep(grid_spec(), root)  # the rerun (in this process) computes the lost cell only
    assert sorted(rerun.computed) == sorted(summary.failed) and not rerun.failed
    assert not any((root / "tmp").iterdir()) and not any((root / "failed").iterdir())
    assert store_files(root) == store_files(reference)  # the same tables as the in-process run, bitwise


def test_a_local_ray_instance_gives_the_same_store_bitwise(tmp_path, reference):
    pytest.importorskip("ray")
    root = tmp_path / "store"
    summary = run_sweep(grid_spec(), root, executor="ray", num_cpus=2)
    assert len(summary.computed) == 8, summary.failed
    assert store_files(root) == store_files(reference)


# ---- reading the store --------------------------------------------------------------------------
def test_pandas_pyarrow_dataset_and_duckdb_read_the_store_as_documented(reference):
    """The one-liners of docs/sweeps.md, with the store's path, against the per-cell Results."""
    import duckdb
    import pyarrow.dataset as ds

    from iclgd_lens.engine.results import Results

    per_cell = [
        Results.load(reference / "cells" / k / "results.json").table for k in Store(reference).done_keys()
    ]
    stacked = pd.concat(per_cell)
    store = str(reference)
    files = glob.glob(f"{store}/cells/*/results.parquet")
    df = pd.concat(pd.read_parquet(f) for f in files)
    table = ds.dataset(files, format="parquet").to_table()
    means = duckdb.sql(
        f"SELECT model, k, avg(value) FROM read_parquet('{store}/cells/*/results.parquet') "
        "WHERE metric = 'simaou' AND comparison = 'icl~gd' AND head = -1 GROUP BY ALL"
    ).df()
    labels = duckdb.sql(
        f"SELECT key, labels.model, config.gd.lr FROM read_json_auto('{store}/cells/*/cell.json')"
    ).df()

    assert len(df) == table.num_rows == len(stacked)
    assert set(df["model"]) == {"tiny-llama-icl", "tiny-llama-iclobj"} and set(df["k"]) == {1, 2}
    pick = stacked[(stacked.metric == "simaou") & (stacked.comparison == "icl~gd") & (stacked["head"] == -1)]
    by_hand = pick.groupby(["model", "k"])["value"].mean()
    got = means.set_index(["model", "k"]).iloc[:, 0].sort_index()
    assert got.tolist() == pytest.approx(by_hand.sort_index().tolist(), abs=1e-12)
    assert sorted(labels["key"]) == Store(reference).done_keys()
    assert set(labels["lr"]) == {3e-2}  # the default task's own learning rate, resolved into each cell


# ---- failures and studies ------------------------------------------------------------------------
def test_an_incomplete_cell_folder_is_replaced_by_the_new_cell(tmp_path):
    """A cell folder without cell.json (a copy cut short) is not a cell: writing the cell
    replaces it, where a complete cell is kept."""
    store = Store(tmp_path / "store")
    store.create()
    (store.cell_dir("k1")).mkdir()
    (store.cell_dir("k1") / "results.parquet").write_text("half a copy")
    assert store.status("k1") == "missing"

    def write(folder):
        (folder / "results.parquet").write_text("new")
        (folder / "results.json").write_text("{}")

    assert store.write_cell("k1", {"key": "k1"}, write)
    assert store.status("k1") == "done"
    assert (store.cell_dir("k1") / "results.parquet").read_text() == "new"
    assert not store.write_cell("k1", {"key": "k1", "other": 1}, write)  # a complete cell stays
    assert store.cell_info("k1") == {"key": "k1"} and not list((store.root / "tmp").iterdir())


def test_a_cell_whose_data_file_was_deleted_is_damaged_and_the_rerun_computes_it_again(tmp_path, reference):
    """A done cell whose results.json was deleted by hand is not done: --status says so, the
    sweep report leaves it out, and the next run computes that cell alone, bitwise as before."""
    import shutil

    root = tmp_path / "store"
    shutil.copytree(reference, root)
    store = Store(root)
    key = store.done_keys()[0]
    (store.cell_dir(key) / "results.json").unlink()
    assert store.status(key) == "damaged" and key not in store.done_keys()
    spec_file = tmp_path / "grid.toml"
    spec_file.write_text(
        'name = "grid"\nmodels = ["tiny-llama-icl", "tiny-llama-iclobj"]\nk = [1, 2]\nseeds = [0, 1]\n'
        f"n_episodes = 3\nn_queries = 3\nstore = {json.dumps(str(root))}\n"
    )
    listing = cli("sweep", spec_file, "--status")
    assert listing.exit_code == 0, listing.output
    assert f"damaged  {key}" in listing.output and "the next run computes it again" in listing.output
    assert "1 damaged, 7 done" in listing.output
    drawn = cli("render", root, "--out", tmp_path / "left_out")  # the page says what it leaves out
    assert drawn.exit_code == 0, drawn.output
    index = (tmp_path / "left_out" / "index.html").read_text()
    assert "7 finished cells" in index and "Not drawn: 1 damaged cell(s)" in index
    summary = run_sweep(grid_spec(), root)
    assert summary.computed == [key] and len(summary.reused) == 7 and not summary.failed
    assert store_files(root) == store_files(reference)
    assert_no_partial(root)
    (store.cell_dir(key) / "results.json").write_text('{"table": ')  # damaged inside: render says how to mend
    drawn = cli("render", root, "--out", tmp_path / "report")
    assert drawn.exit_code == 2 and len(drawn.output.strip().splitlines()) == 1, drawn.output
    assert f"remove the folder {store.cell_dir(key)} and rerun the sweep" in drawn.output
    assert not (tmp_path / "report").exists()


def test_a_ctrl_c_a_destructor_swallowed_stops_the_sweep_after_that_cell(tmp_path, monkeypatch):
    """The interrupt is remembered: the cell in flight (complete) is kept, the next one is not
    started, and the sweep says how to resume, exit 130 (it used to run every cell and exit 0)."""
    from test_cli import ctrl_c_swallowed_by_a_destructor

    import iclgd_lens.sweep.executors as executors

    real = executors.run_cell

    def run_cell(*args, **kwargs):
        ctrl_c_swallowed_by_a_destructor()
        return real(*args, **kwargs)

    monkeypatch.setattr(executors, "run_cell", run_cell)
    spec_file = tmp_path / "two.toml"
    spec_file.write_text(
        'name = "two"\nmodels = ["tiny-llama-icl"]\nk = [1]\nseeds = [0, 1]\nn_episodes = 2\n'
        f"n_queries = 2\nstore = {json.dumps(str(tmp_path / 'store'))}\n"
    )
    result = cli("sweep", spec_file)
    assert result.exit_code == 130, result.output
    assert (
        "interrupted; the finished cells stay in" in result.output
        and "Exception ignored" not in result.output
    )
    assert len(Store(tmp_path / "store").done_keys()) == 1
    assert_no_partial(tmp_path / "store")


def test_a_user_registered_probe_is_part_of_the_default_cells_key(tmp_path):
    """compare() records every registered probe by default, so registering one changes what a
    cell with the default probes holds: its key records the probes' names and changes too."""
    from iclgd_lens.hooks import probe, unregister

    spec = SweepSpec(k=[1], n_episodes=2, n_queries=2)
    before = plan(spec, tmp_path / "s")[0]

    @probe("test_mlp_out", points=["blocks.{layer}.hook_mlp_out"])
    def mlp_out(acts, ctx):
        return {}

    try:
        after = plan(spec, tmp_path / "s")[0]
    finally:
        unregister("test_mlp_out")
    assert "test_mlp_out" in after.config["probes"] and "test_mlp_out" not in before.config["probes"]
    assert after.key != before.key
    assert plan(spec, tmp_path / "s")[0].key == before.key


def test_a_failed_cell_records_its_one_line_error_and_is_tried_again(tmp_path):
    spec = SweepSpec(models=["tiny-llama-icl"], k=[1, 400], n_episodes=2, n_queries=2, baselines=False)
    summary = run_sweep(spec, tmp_path)
    assert len(summary.computed) == 1 and len(summary.failed) == 1
    ((key, error),) = summary.failed.items()
    assert "context window" in error and "\n" not in error
    rows = {r["key"]: r for r in status_rows(spec, tmp_path)}
    assert rows[key]["status"] == "failed" and rows[key]["error"] == error
    assert not (tmp_path / "cells" / key).exists()
    again = run_sweep(spec, tmp_path)
    assert list(again.failed) == [key] and len(again.reused) == 1 and not again.computed
    from iclgd_lens.report.sweep import render_sweep

    index = render_sweep(tmp_path, tmp_path.parent / f"{tmp_path.name}-report").read_text()
    assert (
        "1 finished cell " in index
        and "1 finished cells" not in index
        and "Not drawn: 1 failed cell(s)" in index
    )  # said, not dropped silently


def test_data_changed_between_planning_and_running_fails_the_cell_instead_of_filing_it_wrongly(tmp_path):
    from iclgd_lens.sweep import run_cell

    data = tmp_path / "mine.csv"
    data.write_text("text,label,split\nw1 w2,A,train\nw3 w4,B,test\n")
    spec = SweepSpec(tasks=[{"data": str(data), "template": "{text} :", "label_words": ["A", "B"]}], k=[1])
    planned = plan(spec, tmp_path / "store")[0]
    data.write_text("text,label,split\nw1 w2,B,train\nw3 w4,B,test\n")
    assert run_cell(tmp_path / "store", planned) == "failed"
    assert "changed after the sweep was planned" in Store(tmp_path / "store").failure(planned.key)
    assert plan(spec, tmp_path / "store")[0].key != planned.key  # the new data is a new cell


def test_a_study_cell_runs_the_causal_study_inside_the_sweep(tmp_path):
    from iclgd_lens.study import StudyResult

    spec = SweepSpec(
        models=["tiny-llama-icl"],
        k=[2],
        seeds=[0, 1],
        n_episodes=2,
        n_queries=2,
        study={"name": "causal", "untrained": False},
    )
    summary = run_sweep(spec, tmp_path)
    assert len(summary.computed) == 2, summary.failed
    store = Store(tmp_path)
    for key in store.done_keys():
        files = {p.name for p in store.cell_dir(key).iterdir()}
        assert {"cell.json", "study.json", "study.parquet"} <= files
        result = store.load_study(key)
        assert isinstance(result, StudyResult) and result.name == "causal" and len(result.table)
        assert store.cell_info(key)["config"]["study"] == {"name": "causal", "untrained": False}
        assert pd.read_parquet(store.cell_dir(key) / "study.parquet").shape == result.table.shape
    seeds = {store.cell_info(k)["labels"]["seed"] for k in store.done_keys()}
    assert seeds == {0, 1}
    assert run_sweep(spec, tmp_path).computed == []

    from iclgd_lens.report.sweep import render_sweep

    index = render_sweep(tmp_path, tmp_path / "page")  # study cells are listed and linked to their pages
    for key in store.done_keys():
        assert f'href="cells/{key}/index.html"' in index.read_text()
        assert "causal" in (index.parent / "cells" / key / "index.html").read_text()


def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    """--partition, --gpus-per-task, --mem-gb, --time-limit, --array-parallelism and any other
    slurm_* option end up in submitit's sbatch file (a stand-in `srun` makes submitit build it here)."""
    import submitit

    from iclgd_lens.sweep.executors import submitit_parameters

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    params = submitit_parameters(
        "slurm",
        4,
        partition="gpu",
        gpus_per_task=1,
        mem_gb=64,
        timeout_min=120,
        array_parallelism=8,
        slurm_args={"qos": "high"},
    )
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--mem=64GB",
        "--time=120",
        "--cpus-per-task=4",
        "--qos=high",
    ):
        assert f"#SBATCH {line}\n" in script
    assert "export OMP_NUM_THREADS=4" in script
    assert executor._executor.parameters["array_parallelism"] == 8


def test_dry_run_estimates_equal_the_engines_own_on_the_loaded_model(tmp_path):
    """Work and memory from config, weight-file headers and tokenizer alone equal what
    compare.estimate_flops and engine.memory.plan_compare say with the model loaded."""
    from iclgd_lens.engine.compare import estimate_flops
    from iclgd_lens.engine.gd import GDConfig
    from iclgd_lens.engine.memory import plan_compare
    from iclgd_lens.models import load_model
    from iclgd_lens.sweep.estimate import estimate
    from iclgd_lens.sweep.identity import Resolver

    spec = SweepSpec(models=["tiny-llama-iclobj"], k=[4], n_episodes=3, n_queries=5, gd=["shen"])
    planned = plan(spec, tmp_path)[0]
    task = Resolver().task(planned.cell.task, 0)
    got = estimate(planned, task)
    model = load_model("tiny-llama-iclobj")
    gd = GDConfig.resolve("shen", task)
    episodes = task.episodes(4, 3, 5, 0)
    assert got["tflop"] * 1e12 == pytest.approx(estimate_flops(model, task, episodes, gd, True), rel=1e-12)
    expected = plan_compare(model, task, gd="shen", k=4, n_episodes=3, n_queries=5, batch_size=64).total_bytes
    assert got["memory_gb"] * 2**30 == pytest.approx(expected, rel=1e-9)
    assert got["n_params"] == sum(p.numel() for p in model.original_model.parameters())


def test_dry_run_says_which_cells_compare_would_refuse(tmp_path):
    """A cell whose prompts cannot fit the model's context window is flagged by --dry-run with
    the very error `compare` raises when that cell runs (k = 100 on the 256-token tiny model);
    a cell that fits gets its estimate."""
    from iclgd_lens.engine.compare import compare
    from iclgd_lens.models import load_model
    from iclgd_lens.sweep.estimate import estimate
    from iclgd_lens.sweep.identity import Resolver

    spec = SweepSpec(models=["tiny-llama-icl"], k=[8, 100], n_episodes=2, n_queries=2)
    fits, too_long = plan(spec, tmp_path)
    task = Resolver().task(fits.cell.task, 0)
    assert estimate(fits, task)["cannot_run"] is None and estimate(fits, task)["tflop"] > 0
    refused = estimate(too_long, task)
    with pytest.raises(IclgdError) as err:
        compare(load_model("tiny-llama-icl"), task, k=100, n_episodes=2, n_queries=2, progress=False)
    assert refused["cannot_run"] == str(err.value) and refused["tflop"] is None

    (tmp_path / "g.toml").write_text(
        'models = ["tiny-llama-icl"]\ntasks = ["default"]\nk = [8, 100]\nn_episodes = 2\nn_queries = 2\n'
    )
    result = cli("sweep", tmp_path / "g.toml", "--dry-run")
    assert result.exit_code == 0
    assert "k=100" in result.stdout and "cannot run: k=100 demonstrations" in result.stdout
    assert "1 cell(s) cannot run" in result.stdout


def test_an_exclude_that_matches_no_cell_is_said():
    """A typo in an exclude entry (a label spelled otherwise) would silently run the cells meant
    to be left out: it is named in a warning (one line on the command line)."""
    spec = SweepSpec(k=[1, 2], models=["tiny-llama-icl"], exclude=[{"k": 2}, {"model": "tiny-llama-ICL"}])
    with pytest.warns(UserWarning, match="exclude \\{'model': 'tiny-llama-ICL'\\} matches no cell") as caught:
        grid = cells(spec)
    assert [c.k for c in grid] == [1] and len(caught) == 1


def test_dry_run_says_a_gd_layer_the_model_lacks(tmp_path):
    """GD on one layer's V (Shen's v_single) at a layer index beyond the model is flagged by
    --dry-run with the error the run would record, not only when the cell runs."""
    (tmp_path / "g.toml").write_text(
        'models = ["tiny-llama-icl"]\nk = [2]\nn_episodes = 2\nn_queries = 2\n'
        'gd = ["dai", {preset = "shen", params = "v_single", layer = 99}]\n'
    )
    result = cli("sweep", tmp_path / "g.toml", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "cannot run: GD layer 99 is out of range for a model with 4 layers" in result.stdout
    assert "1 cell(s) cannot run" in result.stdout and not (tmp_path / "iclgd-store").exists()


def test_an_interrupted_sweep_says_how_to_resume(tmp_path, monkeypatch):
    import iclgd_lens.sweep.run as sweep_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_run, "run_sweep", interrupted)
    (tmp_path / "g.toml").write_text('models = ["tiny-llama-icl"]\nk = [2]\nn_episodes = 2\nn_queries = 2\n')
    result = cli("sweep", tmp_path / "g.toml", "--store", tmp_path / "store")
    assert result.exit_code == 130
    assert (
        "interrupted; the finished cells stay in" in result.stderr
        and "the same command resumes" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1  # that line alone, not a generic one beside it


def test_cells_of_two_specs_that_read_alike_stay_apart_in_the_report(tmp_path):
    """Labels are unique within a spec; two specs written into one store can still give two cells
    the same labels (default, and default with another learning rate alone): the report tells
    them apart by key rather than pooling their episodes."""
    from iclgd_lens.report.sweep import combined_table, dai_table, store_cells

    small = dict(k=[1], n_episodes=2, n_queries=2, baselines=False)
    run_sweep(SweepSpec(tasks=["default"], **small), tmp_path / "store")
    run_sweep(SweepSpec(tasks=[{"name": "default", "gd_lr": 0.3}], **small), tmp_path / "store")
    cells_ = store_cells(tmp_path / "store")
    table = dai_table(combined_table(cells_))
    assert len(table) == 2 and len(set(table["task"])) == 2
    assert all(t.startswith("default [") for t in table["task"])
    assert sorted(c.labels["task"] for c in cells_) == sorted(f"default [{c.setting}]" for c in cells_)


def test_two_settings_of_one_store_pool_their_seeds_apart(tmp_path):
    """Two specs in one store that differ only in n_queries, each with seeds 0 and 1 (and, in the
    audit's case, each with one seed: 0 and 1): the report keeps the settings apart and pools each
    one's seeds. It grouped on the seed too, so cells of different settings and different seeds
    were pooled as one setting's seeds, and told-apart cells no longer pooled their seeds."""
    from iclgd_lens.report.sweep import combined_table, dai_table, store_cells

    small = dict(k=[1], n_episodes=2, baselines=False)
    run_sweep(SweepSpec(seeds=[0, 1], n_queries=2, **small), tmp_path / "store")
    run_sweep(SweepSpec(seeds=[0, 1], n_queries=3, **small), tmp_path / "store")
    table = dai_table(combined_table(store_cells(tmp_path / "store")))
    assert len(table) == 2 and len(set(table["task"])) == 2
    assert list(table["episodes"]) == [4, 4]  # 2 seeds x 2 episodes each, pooled per setting

    run_sweep(SweepSpec(seeds=[0], n_queries=2, **small), tmp_path / "one")
    run_sweep(SweepSpec(seeds=[1], n_queries=3, **small), tmp_path / "one")
    table = dai_table(combined_table(store_cells(tmp_path / "one")))
    assert len(table) == 2 and list(table["episodes"]) == [2, 2]  # two settings, not one of two seeds


def test_exclude_names_a_model_by_its_relative_path_as_models_do(tmp_path):
    """`exclude = [{model = "./m"}]` beside `models = ["./m", ...]`: the models were read against
    the spec's folder and the exclude rule was not, so it matched nothing and the cell ran."""
    import warnings

    import iclgd_lens.models
    from iclgd_lens.sweep.spec import load_spec

    shutil.copytree(Path(iclgd_lens.models.__file__).parent / "tiny-llama-icl", tmp_path / "m")
    (tmp_path / "s.toml").write_text(
        'models = ["./m", "tiny-llama-iclobj"]\nk = [1]\nexclude = [{model = "./m"}]\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "matches no cell" note
        planned = cells(load_spec(tmp_path / "s.toml"))
    assert [c.model for c in planned] == ["tiny-llama-iclobj"]


def test_an_unreadable_failure_record_says_so():
    store = Store(Path("/nonexistent-store"))
    assert store.failure("abc").startswith("(its failure record /nonexistent-store/failed/abc.json cannot")
